"""The CPU-tuned and the plain (GPU) forms of the hot paths: chosen from the tensor's device, and giving
the same masks and records. `plain_ops()` runs the GPU form on CPU tensors, so it is tested without a GPU."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

import samkit
from samkit.cli import main
from samkit.devices import cpu_tuned, plain_ops, resolve_device
from samkit.errors import InputError
from samkit.masks.upscale import BlockMasks, _count_true
from samkit.models.mask_decoder import MaskDecoder
from samkit.models.tiny_vit import MBConv

pytestmark = pytest.mark.usefixtures("one_thread")

POINTS = np.array([[[60.0, 40.0]], [[300.0, 200.0]], [[500.0, 100.0]], [[10.0, 400.0]], [[620.0, 410.0]]])


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt):
    # fp32 on every machine: the two forms are compared at fp32 rounding (where bf16 is native, "auto" would
    # run the decoder in bf16, whose rounding differs between one prompt at a time and a batch).
    return samkit.load(tiny_ckpt, dtype="fp32")


@pytest.fixture(scope="module")
def pred(tiny_model, photo):
    p = samkit.Predictor(tiny_model)
    p.set_image(photo)
    return p


def test_choice_follows_the_device_and_plain_ops_forces_the_gpu_form():
    x = torch.zeros(2)
    assert cpu_tuned(x) and cpu_tuned(torch.device("cpu"))
    assert not cpu_tuned(torch.zeros(2, device="meta")) and not cpu_tuned(torch.device("cuda", 0))
    with plain_ops():
        assert not cpu_tuned(x)
        with plain_ops():
            assert not cpu_tuned(x)
        assert not cpu_tuned(x)  # the inner block restores the outer one's setting
    assert cpu_tuned(x)
    with pytest.raises(RuntimeError), plain_ops():
        raise RuntimeError
    assert cpu_tuned(x)  # restored on an exception too


def _calls(monkeypatch, owner, name) -> list[int]:
    """Count calls of owner.name (still calling the original)."""
    calls: list[int] = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_one_click_gpu_form_upsamples_on_the_device_and_decodes_in_one_batch(pred, monkeypatch):
    dec = pred.model.mask_decoder
    labels = np.ones((len(POINTS), 1))
    opencv = _calls(monkeypatch, cv2, "resize")
    attend = _calls(monkeypatch, MaskDecoder, "attend")
    masks, scores, low = pred.predict_batch(POINTS, labels)
    logits, _, _ = pred.predict_batch(POINTS, labels, return_logits=True)
    # OpenCV: 2 resizes per mask (5 prompts x 3 masks) and call; one prompt at a time on a CPU.
    assert len(opencv) == 2 * 2 * 15 and len(attend) == 2 * len(POINTS)
    opencv.clear()
    attend.clear()
    with plain_ops():
        g_masks, g_scores, g_low = pred.predict_batch(POINTS, labels)
        g_logits, _, _ = pred.predict_batch(POINTS, labels, return_logits=True)
        one, one_score, _ = pred.predict(POINTS[1], labels[1])
    assert opencv == [] and len(attend) == 3  # the whole batch at once, no OpenCV
    assert dec is pred.model.mask_decoder

    assert g_masks.dtype == bool and g_masks.shape == masks.shape == (5, 3, *pred.original_size)
    np.testing.assert_allclose(g_scores, scores, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(g_low, low, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(g_logits, logits, atol=1e-4, rtol=1e-4)
    # Masks agree except where a logit is within float rounding of the threshold.
    clear = np.abs(logits) > 1e-3
    assert masks.any() and (~masks).any()
    assert np.array_equal(g_masks[clear], masks[clear])
    assert (g_masks != masks).mean() < 1e-5
    assert np.array_equal(one, g_masks[1]) and np.allclose(one_score, g_scores[1], atol=1e-6)


def test_mask_head_runs_whole_in_the_gpu_form_in_bands_on_a_cpu(monkeypatch):
    torch.manual_seed(0)
    dec = MaskDecoder(transformer_dim=32).eval()
    hs, src = torch.randn(2, 7, 32), torch.randn(2, 64 * 64, 32)
    bands = _calls(monkeypatch, MaskDecoder, "_mask_band")
    with torch.no_grad():
        tuned = dec.masks_from(hs, src)
        assert len(bands) == 4  # 64 rows of tokens, 16 at a time
        bands.clear()
        with plain_ops():
            plain = dec.masks_from(hs, src)
    assert len(bands) == 1 and plain.shape == (2, 4, 256, 256)
    assert torch.equal(plain, tuned)


def test_mbconv_runs_whole_in_the_gpu_form(monkeypatch):
    torch.manual_seed(0)
    block = MBConv(16, 4.0).eval()
    x = torch.randn(1, 16, 70, 40)
    convs = _calls(monkeypatch, torch.nn.functional, "conv2d")
    with torch.no_grad():
        banded = block(x)
        assert len(convs) == 3 * 3  # 3 convolutions per band of 32 rows, 3 bands
        convs.clear()
        with plain_ops():
            whole = block(x)
    assert len(convs) == 3
    torch.testing.assert_close(whole, banded, atol=1e-5, rtol=1e-5)


def test_candidate_blocks_stay_unpacked_and_are_counted_by_torch_in_the_gpu_form():
    g = torch.Generator().manual_seed(0)
    bits = torch.rand(5, 32, 32, generator=g) > 0.5
    masks = BlockMasks(torch.zeros(2, 3, 3, dtype=torch.bool), torch.zeros(5, 3, dtype=torch.int64), bits)
    packed = masks.packed()
    assert packed.exact_bits.dtype == torch.uint8 and torch.equal(packed.bits(), bits)
    counts = _count_true(bits)
    with plain_ops():
        assert masks.packed().exact_bits is bits
        assert torch.equal(_count_true(bits), counts)
    assert counts.tolist() == bits.flatten(1).sum(1).tolist()


@pytest.mark.parametrize("crop_n_layers", [0, 1])
def test_segment_everything_gpu_form_gives_the_same_records(tiny_model, photo, crop_n_layers, monkeypatch):
    opts = dict(points_per_side=6, points_per_batch=16, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    opts.update(box_nms_thresh=1.0, crop_nms_thresh=1.0)  # the tiny random model repeats its masks: keep all
    gen = samkit.MaskGenerator(tiny_model, output_mode="coco_rle", crop_n_layers=crop_n_layers, **opts)
    threads = _calls(monkeypatch, samkit.everything.generator, "ThreadPoolExecutor")
    torch.set_num_threads(2)  # the CPU form then decodes batches in 2 Python threads
    cpu = gen.generate(photo)
    assert threads  # the CPU form ran its threads
    threads.clear()
    with plain_ops():
        gpu = gen.generate(photo)
    assert threads == []
    assert len(cpu) > 50 and len(gpu) == len(cpu)
    identical = 0
    for a, b in zip(cpu, gpu, strict=True):
        assert a["crop_box"] == b["crop_box"] and a["point_coords"] == b["point_coords"]
        assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=1e-5)
        assert a["stability_score"] == pytest.approx(b["stability_score"], abs=1e-4)
        identical += a["segmentation"] == b["segmentation"]
        # A batch of prompts decoded at once rounds differently from one at a time: a pixel whose logit
        # is within float rounding of the threshold may flip, nothing more.
        ma, mb = _decode(a["segmentation"]), _decode(b["segmentation"])
        assert (ma != mb).sum() <= max(2, ma.sum() // 10_000)
        assert np.abs(np.subtract(a["bbox"], b["bbox"])).max() <= 1
    assert identical >= 0.9 * len(cpu)


def _decode(segmentation: dict) -> np.ndarray:
    return mask_utils.decode({"size": segmentation["size"], "counts": segmentation["counts"].encode()})


def test_resolve_device_names_what_this_machine_lacks_in_one_line():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(InputError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")  # one past the last, or any without CUDA
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(InputError, match="no CUDA device") as exc:
            resolve_device("cuda")
        assert "\n" not in str(exc.value)


def test_everything_cli_device_option(tiny_ckpt, tmp_path, capsys):
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    from PIL import Image

    Image.fromarray(np.full((40, 60, 3), 90, dtype=np.uint8)).save(image)
    args = ["everything", str(image.parent), "--out", str(tmp_path / "out"), "--model", tiny_ckpt]
    args += ["--points-per-side", "2"]
    assert main([*args, "--device", "cpu"]) == 0 and (tmp_path / "out" / "a.json").exists()
    capsys.readouterr()
    assert main([*args, "--device", "cuda:99", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("samkit: error: device 'cuda:99'") and "\n" not in err
    assert main([*args, "--device", "cuda", "--engine", "ray"]) == 2
    assert "--gpus-per-worker" in capsys.readouterr().err
