"""ONNX export and OnnxPredictor: parity with the torch Predictor on real photos, int8 accuracy, no-torch import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PHOTOS, ROOT

import samkit
from samkit.errors import CheckpointError, InputError, PromptError, StateError
from samkit.export import SPEC_NAME, export_onnx
from samkit.export.onnx_export import quantize_export
from samkit.models.build import SamConfig, build_sam
from samkit.models.sam import Sam
from samkit.onnx_predictor import OnnxPredictor

pytest.importorskip("onnxruntime")

PROMPTS = [
    {"point_coords": [[300.0, 200.0]], "point_labels": [1]},
    {"point_coords": [[300.0, 200.0], [100.0, 50.0]], "point_labels": [1, 0]},
    {"box": [100.0, 80.0, 420.0, 330.0]},
    {"point_coords": [[250.0, 210.0]], "point_labels": [1], "box": [100.0, 80.0, 420.0, 330.0]},
    {"point_coords": [[200.0, 150.0]], "point_labels": [1], "multimask_output": False},
]


def _load_or_skip(name: str) -> Sam:
    """The model, or a skip when its weights are neither in the cache nor downloadable (no network).
    A damaged cached file, or a load that fails for any other reason, fails the test."""
    from samkit.download import cache_dir
    from samkit.errors import DownloadError

    try:
        return samkit.load(name, dtype="fp32", progress=False)
    except DownloadError as exc:
        if (cache_dir() / samkit.registry()[name].filename).exists():
            raise
        pytest.skip(f"{name} weights not downloaded ({cache_dir()}): {str(exc).splitlines()[0]}")


def _randomised(model: torch.nn.Module) -> None:
    """Give zero-initialised tables (rel-pos, pos_embed) non-trivial values, as trained weights have."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and ("rel_pos" in name or "pos_embed" in name):
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)


@pytest.fixture(scope="session")
def vit_t(tmp_path_factory):
    """(MobileSAM with its real weights, its fp32 export folder)."""
    model = _load_or_skip("vit_t")
    out = tmp_path_factory.mktemp("onnx") / "vit_t"
    export_onnx(model, out)
    return model, out


@pytest.fixture(scope="session")
def vit_t_int8(vit_t, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "vit_t_int8"
    quantize_export(vit_t[1], out)
    return out


@pytest.fixture(scope="session")
def vit_b_small(tmp_path_factory):
    """A random-weight ViT-B of depth 2 (one windowed, one global block), exported: same code as vit_b/l/h."""
    torch.manual_seed(3)
    model = build_sam(SamConfig("vit", 768, 2, 12, (1,)))
    _randomised(model)
    model.arch = "vit_b_depth2"
    out = tmp_path_factory.mktemp("onnx") / "vit_b_small"
    export_onnx(model, out)
    return model, out


def _photos(n: int) -> list[np.ndarray]:
    return [samkit.load_image(p) for p in PHOTOS[:n]]


def _compare(model, onnx_dir: Path, image: np.ndarray) -> None:
    """End to end on one photo: embedding, then every prompt kind, logits and masks vs the torch Predictor.

    The decoder alone (both fed the torch embedding) must match to 1e-3 absolute. End to end, the
    encoder's float32 noise (~1e-6 relative) is amplified on large logits, so there the bound is
    1e-3 + 1e-4 * |logit| (measured: at most ~1.2e-3 on logits of magnitude ~37).
    """
    torch_pred = samkit.Predictor(model)
    onnx_pred = OnnxPredictor(onnx_dir, num_threads=2)
    torch_pred.set_image(image)
    onnx_pred.set_image(image)
    emb = torch_pred.embedding.numpy()
    assert np.abs(onnx_pred.embedding - emb).max() <= 1e-4 * max(1.0, float(np.abs(emb).max()))
    assert onnx_pred.original_size == torch_pred.original_size
    assert onnx_pred.input_size == torch_pred.input_size
    same_emb = OnnxPredictor(onnx_dir, num_threads=2)
    same_emb.set_embedding(emb, torch_pred.original_size)
    _, _, low = torch_pred.predict(**PROMPTS[0])
    prompts = [*PROMPTS, {"mask_input": low[:1]}, {**PROMPTS[0], "mask_input": low[:1]}]
    for prompt in prompts:
        tm, ts, tl = torch_pred.predict(**prompt, return_logits=True)
        om, os_, ol = onnx_pred.predict(**prompt, return_logits=True)
        assert om.shape == tm.shape and ol.shape == tl.shape
        np.testing.assert_allclose(ol, tl, atol=1e-3, rtol=1e-4)
        np.testing.assert_allclose(os_, ts, atol=1e-3, rtol=0)
        agree = ((om > 0) == (tm > 0)).mean()
        assert agree >= 0.999, f"{prompt}: masks agree on {agree:.5f} of pixels"
        dm, ds, dl = same_emb.predict(**prompt, return_logits=True)
        np.testing.assert_allclose(dl, tl, atol=1e-3, rtol=0)
        np.testing.assert_allclose(dm, tm, atol=1e-3, rtol=0)


def test_export_writes_graphs_and_contract(vit_t) -> None:
    import onnxruntime as ort

    _, out = vit_t
    spec = json.loads((out / SPEC_NAME).read_text())
    assert spec["model"] == "vit_t" and spec["image_size"] == 1024 and spec["quantization"] is None
    assert spec["embedding_shape"] == [1, 256, 64, 64]
    assert spec["preprocess"]["pixel_mean"] == pytest.approx([123.675, 116.28, 103.53])
    dec = ort.InferenceSession(str(out / "decoder.onnx"), providers=["CPUExecutionProvider"])
    inputs = {i.name: i.shape for i in dec.get_inputs()}
    assert inputs == {
        "image_embeddings": [1, 256, 64, 64],
        "point_coords": [1, "num_points", 2],
        "point_labels": [1, "num_points"],
        "mask_input": [1, 1, 256, 256],
        "has_mask_input": [1],
        "orig_im_size": [2],
    }
    assert [o.name for o in dec.get_outputs()] == ["masks", "iou_predictions", "low_res_masks"]
    enc = ort.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"])
    assert enc.get_inputs()[0].shape == [1, 3, 1024, 1024]
    assert enc.get_outputs()[0].shape == [1, 256, 64, 64]


def test_vit_t_real_weights_match_torch_on_photos(vit_t) -> None:
    _compare(vit_t[0], vit_t[1], _photos(1)[0])


def test_vit_b_random_matches_torch(vit_b_small) -> None:
    _compare(vit_b_small[0], vit_b_small[1], _photos(2)[1])


def test_medsam_lite_minmax_and_area_resize_match_torch(tmp_path) -> None:
    model = _load_or_skip("medsam_lite")
    export_onnx(model, tmp_path)
    spec = json.loads((tmp_path / SPEC_NAME).read_text())
    assert spec["preprocess"]["normalize"] == "minmax" and spec["preprocess"]["resize"] == "area"
    _compare(model, tmp_path, _photos(1)[0])


def test_int8_masks_close_to_fp32(vit_t, vit_t_int8) -> None:
    """Best-scoring mask of each click: int8 vs fp32 IoU (the figure the README reports), no empty mask.

    On a VNNI CPU this checks the quantization itself; the saturation a CPU without VNNI adds is ruled
    out for these exact graphs by `test_int8_weights_cannot_saturate_without_vnni`."""
    fp32 = OnnxPredictor(vit_t[1], num_threads=2)
    int8 = OnnxPredictor(vit_t_int8, num_threads=2)
    assert json.loads((vit_t_int8 / SPEC_NAME).read_text())["quantization"].startswith("int8")
    assert (vit_t_int8 / "encoder.onnx").stat().st_size < 0.5 * (vit_t[1] / "encoder.onnx").stat().st_size
    rng = np.random.default_rng(0)
    ious = []
    for image in _photos(1):
        fp32.set_image(image)
        int8.set_image(image)
        h, w = image.shape[:2]
        for _ in range(8):
            click = [[rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h]]
            a_masks, a_scores, _ = fp32.predict(click, [1])
            b_masks, _, _ = int8.predict(click, [1])
            a, b = a_masks[a_scores.argmax()], b_masks[a_scores.argmax()]
            assert b.any(), f"int8 mask of click {click} is empty"
            ious.append((a & b).sum() / max((a | b).sum(), 1))
    print(f"int8 vs fp32 best-mask IoU: mean {np.mean(ious):.4f}, min {np.min(ious):.4f}")
    assert np.mean(ious) >= 0.97


def _u8s8_without_vnni(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """uint8 (M, K) @ int8 (K, N) as x86 CPUs without VNNI run it (`vpmaddubsw`): each pair of products
    along K is summed into a saturating int16, then the pairs are added in int32."""
    prod = a[:, :, None].astype(np.int32) * w[None].astype(np.int32)  # (M, K, N)
    pairs = prod[:, 0::2] + prod[:, 1::2]
    return np.clip(pairs, -32768, 32767).sum(1)


def _int8_weights(path: Path) -> list[np.ndarray]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    return [numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]


def test_int8_weights_cannot_saturate_without_vnni(vit_t, vit_t_int8) -> None:
    """Runs on any x86-64: the int8 graphs hold 7-bit weights, so AVX2's 16-bit pair sums are exact.

    uint8 activations (<= 255) times weights in [-64, 64] give pairs of at most 2 * 255 * 64 = 32640 <= 32767.
    The emulated AVX2 product equals the exact one on worst-case activations for the real vit_t weights,
    and differs for the same matrix at full 8-bit range (what the export wrote before, which gave empty
    masks on AVX2 machines).
    """
    spec = json.loads((vit_t_int8 / SPEC_NAME).read_text())
    assert spec["int8"]["reduce_range"] is True and spec["int8"]["activations"] == "QUInt8"
    weights = [w for name in ("encoder.onnx", "decoder.onnx") for w in _int8_weights(vit_t_int8 / name)]
    assert len(weights) > 50
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= 64
    big = max((w for w in weights if w.ndim == 2), key=lambda w: np.abs(w.astype(np.int32)).sum())
    big = big[: big.shape[0] // 2 * 2, :64]
    # The worst case for each column: activation 255 where the weight has the column's dominant sign.
    a = np.where(big.T >= 0, 255, 0).astype(np.uint8)
    exact = a.astype(np.int32) @ big.astype(np.int32)
    np.testing.assert_array_equal(_u8s8_without_vnni(a, big), exact)
    full = np.clip(np.round(big.astype(np.float32) * 127 / 64), -127, 127).astype(np.int8)
    exact_full = a.astype(np.int32) @ full.astype(np.int32)
    assert (_u8s8_without_vnni(a, full) != exact_full).any()


def test_predict_batch_and_embedding_files_interoperate(vit_t, tmp_path) -> None:
    model, out = vit_t
    image = _photos(1)[0]
    torch_pred = samkit.Predictor(model)
    torch_pred.set_image(image)
    torch_pred.save_embedding(tmp_path / "e.safetensors")
    onnx_pred = OnnxPredictor(out)
    onnx_pred.load_embedding(tmp_path / "e.safetensors")  # no encoder run
    assert onnx_pred._encoder is None
    coords = np.array([[[300.0, 200.0], [0.0, 0.0]], [[120.0, 90.0], [400.0, 300.0]]])
    labels = np.array([[1, -1], [1, 0]])
    tm, ts, _ = torch_pred.predict_batch(coords, labels)
    om, os_, _ = onnx_pred.predict_batch(coords, labels)
    assert om.shape == tm.shape == (2, 3, *image.shape[:2])
    assert (om == tm).mean() >= 0.999
    np.testing.assert_allclose(os_, ts, atol=1e-3)
    onnx_pred.save_embedding(tmp_path / "o.safetensors")
    torch_pred.load_embedding(tmp_path / "o.safetensors")
    assert torch_pred.original_size == image.shape[:2]


def test_user_errors_are_one_line(vit_t, tmp_path) -> None:
    _, out = vit_t
    with pytest.raises(CheckpointError, match="has no samkit_onnx.json"):
        OnnxPredictor(tmp_path)
    pred = OnnxPredictor(out)
    with pytest.raises(StateError, match="set_image"):
        pred.predict([[1, 1]], [1])
    pred.set_embedding(np.zeros((1, 256, 64, 64), np.float32), (100, 200))
    with pytest.raises(PromptError, match="outside the 200x100 image"):
        pred.predict([[250, 10]], [1])
    with pytest.raises(PromptError, match="no prompt"):
        pred.predict()
    with pytest.raises(InputError, match="embedding must be"):
        pred.set_embedding(np.zeros((1, 256, 32, 32), np.float32), (100, 200))
    with pytest.raises(InputError, match="opset 9 is not supported"):
        export_onnx(vit_t[0], tmp_path / "x", opset=9)


def test_onnx_predictor_runs_without_torch(vit_t) -> None:
    """`import samkit.onnx_predictor` and a full predict in a process where torch cannot be imported."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np, samkit\n"
        f"p = samkit.OnnxPredictor({str(vit_t[1])!r}, num_threads=2)\n"
        f"p.set_image({str(PHOTOS[0])!r})\n"
        "m, s, _ = p.predict([[300, 200]], [1])\n"
        "assert 'torch' not in [k for k, v in sys.modules.items() if v is not None]\n"
        "print(m.shape, m.sum() > 0)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "True" in res.stdout


def test_cli_export_onnx_of_a_checkpoint(vit_b_small, tmp_path) -> None:
    from samkit.cli import main

    ckpt = samkit.save(vit_b_small[0], tmp_path / "small.safetensors")
    assert main(["export-onnx", "--model", str(ckpt), "--out", str(tmp_path / "o"), "--opset", "19"]) == 0
    spec = json.loads((tmp_path / "o" / SPEC_NAME).read_text())
    assert spec["opset"] == 19 and (tmp_path / "o" / "encoder.onnx").is_file()
    assert main(["export-onnx", "--model", str(ckpt), "--out", str(tmp_path / "p"), "--opset", "9"]) == 2


def test_cli_old_export_onnx_form_names_the_new_command(tmp_path, capsys) -> None:
    from samkit.cli import main

    out = tmp_path / "o"
    assert main(["export", "onnx", "--model", "vit_t", "--out", str(out), "--quantize", "int8"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "samkit: error: `samkit export` writes annotations; models go to ONNX with `samkit export-onnx`"
        " (same options)\n"
    )
    assert not out.exists()


def test_cli_export_is_annotations_only_and_export_onnx_is_models(tmp_path, capsys) -> None:
    from samkit.cli import main

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    assert "--db" in text and "onnx" not in text and "--model" not in text
    with pytest.raises(SystemExit):
        main(["export-onnx", "--help"])
    text = capsys.readouterr().out
    assert "samkit export-onnx --model vit_t --out vit_t_onnx/ [--quantize int8] [--opset 18]" in text
    assert "--db" not in text
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--out", str(tmp_path / "d")])  # the database is required now
    assert exit_.value.code == 2 and "--db" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "samkit export onnx" not in capsys.readouterr().out


def test_old_8bit_int8_export_warns_on_a_cpu_without_vnni(vit_t_int8, tmp_path, monkeypatch, caplog) -> None:
    import logging
    import shutil

    from samkit import hardware

    monkeypatch.setattr(
        hardware, "cpu_info", lambda: hardware.CpuInfo("AVX2 CPU", frozenset({"avx2"}), arch="x86_64")
    )
    old = tmp_path / "old"
    shutil.copytree(vit_t_int8, old)
    spec = json.loads((old / SPEC_NAME).read_text())
    del spec["int8"]  # what exports written before 7-bit weights hold
    (old / SPEC_NAME).write_text(json.dumps(spec))
    with caplog.at_level(logging.WARNING, logger="samkit"):
        OnnxPredictor(vit_t_int8)
        assert not caplog.records
        OnnxPredictor(old)
    assert len(caplog.records) == 1 and "without VNNI" in caplog.records[0].getMessage()
