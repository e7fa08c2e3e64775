"""`export_onnx`: a `Sam` -> encoder.onnx + decoder.onnx + samkit_onnx.json, optionally int8-quantized.

Two exporters, each where it gives the right numbers (torch 2.13):
- encoder: the dynamo exporter (`torch.export`), which functionalises in-place updates of views. The
  TorchScript exporter drops them: the ViT attention adds its relative-position bias with `add_` on a
  view of the logits, and its TorchScript export silently loses the bias (embedding off by ~0.1).
  The dynamo exporter emits opset 18 and cannot convert down (no `Pad` adapter), hence opset >= 18.
- decoder: the TorchScript exporter (`dynamo=False`), which traces the crop-and-resize to a size given
  at run time (`orig_im_size`) and a dynamic number of points without symbolic-shape guards.
Both reproduce `samkit.Predictor` to ~1e-4 (tests/test_export_onnx.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from samkit.embedding_file import config_id
from samkit.errors import InputError
from samkit.export.wrappers import DecoderForExport, EncoderForExport
from samkit.models.sam import Sam

SPEC_NAME = "samkit_onnx.json"
ENCODER_NAME = "encoder.onnx"
DECODER_NAME = "decoder.onnx"
MIN_OPSET, MAX_OPSET = 18, 20  # 18: the dynamo exporter's floor; 20: the TorchScript exporter's last.
DEFAULT_OPSET = 18
# Above this many bytes of weights the encoder is written with its weights in encoder.onnx.data
# (protobuf files are limited to 2 GiB): vit_h.
EXTERNAL_DATA_BYTES = 1_500_000_000
QUANTIZE_CHOICES = ("int8",)
INT8_DOC = (
    "int8: onnxruntime quantize_dynamic, MatMul/Gemm weights QInt8 per channel in 7 bits (reduce_range), "
    "activations QUInt8; convolutions fp32"
)
# The quantizer's settings, written into samkit_onnx.json; OnnxPredictor reads `reduce_range` to warn about
# older 8-bit exports on CPUs without VNNI.
INT8_PARAMS = {
    "weights": "QInt8",
    "activations": "QUInt8",
    "per_channel": True,
    "reduce_range": True,
    "op_types": ["MatMul", "Gemm"],
}

ENCODER_INPUTS = ["image"]
ENCODER_OUTPUTS = ["image_embeddings"]
DECODER_INPUTS = [
    "image_embeddings",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
    "orig_im_size",
]
DECODER_OUTPUTS = ["masks", "iou_predictions", "low_res_masks"]


def export_onnx(
    model: Sam,
    out_dir: str | Path,
    *,
    quantize: str | None = None,
    opset: int = DEFAULT_OPSET,
    parts: tuple[str, ...] = ("encoder", "decoder"),
) -> Path:
    """Write `encoder.onnx`, `decoder.onnx` and `samkit_onnx.json` into `out_dir`; return the JSON path.

    quantize: None (fp32) or "int8" (dynamic quantization of the MatMul/Gemm weights with onnxruntime).
    parts: export only some of the two graphs (the JSON still describes both).
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise InputError(
            f"opset {opset} is not supported: use {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})"
        )
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise InputError(f"unknown quantization {quantize!r}: use one of {', '.join(QUANTIZE_CHOICES)}")
    unknown = set(parts) - {"encoder", "decoder"}
    if unknown:
        raise InputError(f"unknown part(s) {sorted(unknown)}: use encoder and/or decoder")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval().float().cpu()
    with tempfile.TemporaryDirectory(dir=out) as tmp_name:
        tmp = Path(tmp_name)
        if "encoder" in parts:
            _export_encoder(model, tmp / ENCODER_NAME, opset)
        if "decoder" in parts:
            _export_decoder(model, tmp / DECODER_NAME, opset)
        _write_spec(tmp, describe(model, None, opset))
        if quantize == "int8":
            return quantize_export(tmp, out)
        for f in tmp.iterdir():  # the graphs, and encoder.onnx.data for a model over 2 GiB
            if f.name != SPEC_NAME:
                f.replace(out / f.name)
        return _write_spec(out, describe(model, None, opset))


def quantize_export(src_dir: str | Path, out_dir: str | Path) -> Path:
    """int8 copy of an fp32 export folder (see `quantize_int8`); returns the new JSON path."""
    src, out = Path(src_dir), Path(out_dir)
    spec = json.loads((src / SPEC_NAME).read_text())
    if spec.get("quantization"):
        raise InputError(f"{src} is already quantized ({spec['quantization']}); quantize an fp32 export")
    out.mkdir(parents=True, exist_ok=True)
    for name in (ENCODER_NAME, DECODER_NAME):
        if (src / name).exists():
            quantize_int8(src / name, out / name)
    spec["quantization"] = INT8_DOC
    spec["int8"] = INT8_PARAMS
    return _write_spec(out, spec)


def _write_spec(out: Path, spec: dict[str, Any]) -> Path:
    path = out / SPEC_NAME
    tmp = path.with_name(SPEC_NAME + ".tmp")
    tmp.write_text(json.dumps(spec, indent=2))
    tmp.replace(path)
    return path


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantization of MatMul/Gemm weights, per output channel (activations at run time).

    Weights use 7 bits ([-64, 64], onnxruntime's `reduce_range`), so the graph is exact on every x86-64.
    onnxruntime multiplies uint8 activations by int8 weights (U8S8). With VNNI (AVX512-VNNI, AVX-VNNI)
    the products accumulate in 32 bits; without it (AVX2, AVX-512 before Cascade Lake) `vpmaddubsw` adds
    each pair of products into a saturating int16: 255 * 127 * 2 = 64770 overflows 32767, and on AVX2
    machines the full-range export gave empty or wrong masks (best-mask IoU 0.61 vs fp32). With 7-bit
    weights a pair is at most 255 * 64 * 2 = 32640, so no sum can saturate. It costs no accuracy here:
    vit_t, 3 photos x 8 clicks, best-mask IoU vs fp32 mean 0.991 (7-bit) vs 0.988 (8-bit, on a VNNI
    CPU where it is exact). Per-channel scales beat per-tensor (0.995 vs 0.991 at 8 bits). Convolutions
    stay fp32; only MatMul/Gemm quantization was measured.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    was_disabled = root.disabled
    # onnxruntime logs a "consider pre-processing" hint on the root logger for every call.
    root.disabled = True
    try:
        with tempfile.TemporaryDirectory() as tmp:
            quantize_dynamic(
                src,
                Path(tmp) / dst.name,
                op_types_to_quantize=INT8_PARAMS["op_types"],
                per_channel=INT8_PARAMS["per_channel"],
                reduce_range=INT8_PARAMS["reduce_range"],
                weight_type=QuantType.QInt8,
                use_external_data_format=src.with_name(src.name + ".data").exists(),
            )
            for f in Path(tmp).iterdir():
                shutil.move(str(f), dst.parent / f.name)
    finally:
        root.disabled = was_disabled


def _export_encoder(model: Sam, path: Path, opset: int) -> None:
    s = model.image_size
    big = sum(p.numel() * p.element_size() for p in model.image_encoder.parameters()) > EXTERNAL_DATA_BYTES
    example = (torch.zeros(1, 3, s, s),)
    encoder = EncoderForExport(model).eval()
    _onnx_export(
        encoder, example, path, opset, ENCODER_INPUTS, ENCODER_OUTPUTS, dynamo=True, external_data=big
    )


def _export_decoder(model: Sam, path: Path, opset: int) -> None:
    g = model.prompt_encoder.image_embedding_size
    m = model.prompt_encoder.mask_input_size
    s = model.image_size
    example = (
        torch.randn(1, 256, g[0], g[1]),
        torch.tensor([[[s * 0.4, s * 0.3], [s * 0.1, s * 0.2], [0.0, 0.0]]]),
        torch.tensor([[1.0, 0.0, -1.0]]),
        torch.zeros(1, 1, m[0], m[1]),
        torch.zeros(1),
        torch.tensor([s * 0.6, float(s)]),
    )
    dynamic = {
        "point_coords": {1: "num_points"},
        "point_labels": {1: "num_points"},
        "masks": {2: "height", 3: "width"},
    }
    decoder = DecoderForExport(model).eval()
    _onnx_export(
        decoder, example, path, opset, DECODER_INPUTS, DECODER_OUTPUTS, dynamo=False, dynamic_axes=dynamic
    )


def _onnx_export(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    opset: int,
    inputs: list[str],
    outputs: list[str],
    **options: Any,
) -> None:
    """`torch.onnx.export` of `module` on `example` inputs (`options`: its other keywords), quietly: the
    tracer warns about every Python-level shape read and torch.export prints its progress; the graphs
    are checked by the tests."""
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example,
            str(path),
            opset_version=opset,
            input_names=inputs,
            output_names=outputs,
            **options,
        )


def describe(model: Sam, quantize: str | None, opset: int) -> dict[str, Any]:
    """The JSON contract next to the .onnx files: inputs, outputs, preprocessing and coordinate frames."""
    s = model.image_size
    g = list(model.prompt_encoder.image_embedding_size)
    m = list(model.prompt_encoder.mask_input_size)
    config = model.config.to_dict() if model.config is not None else None
    return {
        "format": "samkit-onnx",
        "version": 1,
        "model": model.arch or None,
        "config": config,
        # Written into saved embeddings, so that Predictor and OnnxPredictor accept each other's files.
        "model_config_id": config_id(model),
        "opset": opset,
        "quantization": None if quantize is None else INT8_DOC,
        "image_size": s,
        "embedding_shape": [1, 256, *g],
        "mask_input_size": m,
        "mask_threshold": float(model.mask_threshold),
        "preprocess": {
            "color": "RGB, 0..255, channel-first",
            "resize": model.resize,
            "resize_doc": "longest side to image_size: 'bilinear' = PIL bilinear, 'area' = OpenCV "
            "INTER_AREA; (h, w) = int(H * k + 0.5), int(W * k + 0.5) with k = image_size / max(H, W)",
            "normalize": model.normalize,
            "normalize_doc": "'mean_std': (pixel - pixel_mean) / pixel_std; 'minmax': (pixel - min) / "
            "(max - min) over the whole resized image",
            "pixel_mean": [float(v) for v in model.pixel_mean.flatten()],
            "pixel_std": [float(v) for v in model.pixel_std.flatten()],
            "pad": "zeros, bottom and right, to image_size x image_size, after normalisation",
        },
        "frames": {
            "original": "the user's image, (H, W); points (x, y) in pixels",
            "model_input": "the resized image, (h, w) before padding; x' = x * w / W, y' = y * h / H",
        },
        "encoder": {
            "file": ENCODER_NAME,
            "inputs": {"image": {"shape": [1, 3, s, s], "dtype": "float32", "frame": "model_input, padded"}},
            "outputs": {"image_embeddings": {"shape": [1, 256, *g], "dtype": "float32"}},
        },
        "decoder": {
            "file": DECODER_NAME,
            "inputs": {
                "image_embeddings": {"shape": [1, 256, *g], "dtype": "float32"},
                "point_coords": {
                    "shape": [1, "N", 2],
                    "dtype": "float32",
                    "frame": "model_input, (x, y); a box is two points (x0, y0), (x1, y1)",
                },
                "point_labels": {
                    "shape": [1, "N"],
                    "dtype": "float32",
                    "values": "1 foreground, 0 background, 2 box top-left, 3 box bottom-right, -1 padding; "
                    "without a box, append one padding point (0, 0) with label -1",
                },
                "mask_input": {"shape": [1, 1, *m], "dtype": "float32", "frame": "low-res logits, padded"},
                "has_mask_input": {"shape": [1], "dtype": "float32", "values": "1 to use mask_input, else 0"},
                "orig_im_size": {"shape": [2], "dtype": "float32", "values": "(H, W) of the original image"},
            },
            "outputs": {
                "masks": {
                    "shape": [1, 4, "H", "W"],
                    "dtype": "float32",
                    "values": "logits at the original size; mask = logits > mask_threshold; "
                    "index 0 is the single-mask output, 1..3 the multimask candidates",
                },
                "iou_predictions": {"shape": [1, 4], "dtype": "float32"},
                "low_res_masks": {
                    "shape": [1, 4, *m],
                    "dtype": "float32",
                    "frame": "padded model_input at 1/4 scale; feed one back as mask_input",
                },
            },
        },
    }
