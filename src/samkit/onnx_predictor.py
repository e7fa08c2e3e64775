"""OnnxPredictor: the `Predictor` API on onnxruntime, for machines without PyTorch.

Needs only numpy, pillow and onnxruntime (`pip install samkit[onnx]`), plus safetensors for
save/load_embedding. Reads a folder written by `samkit export-onnx` (encoder.onnx, decoder.onnx,
samkit_onnx.json); a folder with only decoder.onnx works with `set_embedding` / `load_embedding`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from samkit.embedding_file import EncoderId
from samkit.errors import CheckpointError, InputError
from samkit.image import ImageLike, load_image
from samkit.prompts import PredictorBase, Prompts
from samkit.transforms import ImagePipeline

SPEC_NAME = "samkit_onnx.json"  # the same name as samkit.export.SPEC_NAME, which needs torch to import


class OnnxPredictor(PredictorBase):
    """Promptable segmentation of one image at a time with the exported ONNX graphs.

    Coordinate frames as in `Predictor`: points (x, y) and boxes XYXY in original-image pixels; masks at
    the original size (H, W); low-res logits (256, 256) in the padded model-input frame.
    """

    def __init__(
        self, model_dir: str | Path, *, num_threads: int | None = None, providers: list[str] | None = None
    ) -> None:
        self.model_dir = Path(model_dir)
        spec_path = self.model_dir / SPEC_NAME
        if not spec_path.is_file():
            raise CheckpointError(
                f"{self.model_dir} has no {SPEC_NAME}: export a model with `samkit export-onnx --out DIR`"
            )
        try:
            self.spec: dict[str, Any] = json.loads(spec_path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {spec_path}: {exc}; export the model again") from None
        _warn_if_int8_may_saturate(self.spec, self.model_dir)
        self.image_size = int(self.spec["image_size"])
        self.mask_threshold = float(self.spec.get("mask_threshold", 0.0))
        pre = self.spec["preprocess"]
        self.transform = ImagePipeline(
            self.image_size,
            pre["pixel_mean"],
            pre["pixel_std"],
            pre.get("normalize", "mean_std"),
            pre.get("resize", "bilinear"),
        )
        # Folders exported before encoder fingerprints have none: their embeddings skip that check.
        self._encoder_id = EncoderId(
            self.spec.get("model") or "",
            self.image_size,
            self.spec.get("model_config_id", ""),
            self.spec.get("encoder_fingerprint", ""),
        )
        h, w = self.spec["mask_input_size"]
        self.mask_input_size = (int(h), int(w))
        self._embedding_shape = tuple(self.spec["embedding_shape"])
        self._num_threads = num_threads
        self._providers = providers or ["CPUExecutionProvider"]
        self._encoder: Any = None
        self._decoder = self._session(self.spec["decoder"]["file"])
        self.reset_image()

    # --- sessions --------------------------------------------------------------------------------------

    def _session(self, name: str) -> Any:
        import onnxruntime as ort

        path = self.model_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: export the model again with `samkit export-onnx`")
        opts = ort.SessionOptions()
        if self._num_threads:
            opts.intra_op_num_threads = self._num_threads
            opts.inter_op_num_threads = 1
        try:
            return ort.InferenceSession(str(path), opts, providers=self._providers)
        except Exception as exc:  # onnxruntime raises its own exception types for a damaged file
            raise CheckpointError(f"cannot load {path}: {str(exc).splitlines()[0]}") from None

    # --- image (its state and embedding file: PredictorBase) -------------------------------------------

    def _encoder_identity(self) -> EncoderId:
        return self._encoder_id

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (1, 3, S, S) float32: resized, normalised, padded bottom-right."""
        return self.transform(image)

    def set_image(self, image: ImageLike) -> None:
        """Encode `image`: an (H, W, 3) uint8 RGB or (H, W) gray array, a PIL image, or a path."""
        arr = load_image(image)
        if self._encoder is None:
            self._encoder = self._session(self.spec["encoder"]["file"])
        (features,) = self._encoder.run(None, {"image": self.preprocess(arr)})
        self.set_embedding(features, (arr.shape[0], arr.shape[1]))

    def set_embedding(self, embedding: np.ndarray, original_size: tuple[int, int]) -> None:
        """Use a precomputed embedding (1, 256, 64, 64) of an image of size (H, W)."""
        emb = np.ascontiguousarray(embedding, dtype=np.float32)
        if emb.ndim == 3:
            emb = emb[None]
        if emb.shape != self._embedding_shape:
            raise InputError(
                f"embedding must be {self._embedding_shape}, got {emb.shape}; re-embed the image"
            )
        self.reset_image()
        self.features = emb
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = self.transform.input_size(self.original_size)

    # --- prompts ---------------------------------------------------------------------------------------

    def _decode_batch(
        self, prompts: Prompts, multimask_output: bool, return_logits: bool, low_res_logits: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`predict_batch` after its checks: one decoder run per prompt (the graph takes one prompt)."""
        features = self._require_image()
        coords, labels, boxes, mask_input = prompts
        batch = next(a.shape[0] for a in (coords, boxes, mask_input) if a is not None)
        sel = slice(1, None) if multimask_output else slice(0, 1)
        outs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for i in range(batch):
            feed = self._decoder_feed(
                features,
                None if coords is None else coords[i],
                None if labels is None else labels[i],
                None if boxes is None else boxes[i],
                None if mask_input is None else mask_input[i],
            )
            masks, iou, low_res = self._decoder.run(None, feed)
            masks = masks[0, sel]
            outs.append(
                (masks if return_logits else masks > self.mask_threshold, iou[0, sel], low_res[0, sel])
            )
        return tuple(np.stack(parts) for parts in zip(*outs, strict=True))  # type: ignore[return-value]

    def _decoder_feed(
        self,
        features: np.ndarray,
        coords: np.ndarray | None,
        labels: np.ndarray | None,
        box: np.ndarray | None,
        mask: np.ndarray | None,
    ) -> dict[str, np.ndarray]:
        """One prompt in original pixels -> the decoder's inputs in the model-input frame."""
        pts: list[np.ndarray] = []
        labs: list[np.ndarray] = []
        if coords is not None and labels is not None:
            pts.append(self.transform.apply_coords(coords, self.original_size))
            labs.append(labels.astype(np.float64))
        if box is not None:
            pts.append(self.transform.apply_coords(box.reshape(2, 2), self.original_size))
            labs.append(np.array([2.0, 3.0]))
        elif coords is not None:
            # SAM's "not a point" token stands in for the missing box, as in the torch prompt encoder.
            pts.append(np.zeros((1, 2)))
            labs.append(np.array([-1.0]))
        pc = np.concatenate(pts) if pts else np.zeros((0, 2))
        pl = np.concatenate(labs) if labs else np.zeros((0,))
        has_mask = mask is not None
        return {
            "image_embeddings": features,
            "point_coords": pc[None].astype(np.float32),
            "point_labels": pl[None].astype(np.float32),
            "mask_input": (mask if has_mask else np.zeros((1, *self.mask_input_size)))[None].astype(
                np.float32
            ),
            "has_mask_input": np.array([1.0 if has_mask else 0.0], dtype=np.float32),
            "orig_im_size": np.array(self.original_size, dtype=np.float32),
        }


def _warn_if_int8_may_saturate(spec: dict[str, Any], model_dir: Path) -> None:
    """One warning line for an int8 export with full 8-bit weights (written before samkit used 7 bits) on
    an x86 CPU without VNNI, where onnxruntime's int8 products can saturate (empty or wrong masks)."""
    if not str(spec.get("quantization") or "").startswith("int8"):
        return
    if (spec.get("int8") or {}).get("reduce_range"):
        return
    from samkit.hardware import cpu_info, log

    cpu = cpu_info()
    if cpu.x86 and not cpu.vnni:
        log.warning(
            f"samkit: {model_dir} holds 8-bit int8 weights, which can saturate on this CPU without VNNI "
            f"({cpu.model}): export it again with `samkit export-onnx --quantize int8`"
        )
