"""MaskGenerator's parts: grids and crops vs the reference, the block upscaler vs PyTorch's interpolation,
windowed small-region cleanup vs the full-image one, and the generator on a tiny random model."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

import samkit
from samkit.errors import InputError
from samkit.everything.cleanup import clean_mask
from samkit.everything.grids import crop_boxes, layer_point_grids
from samkit.masks import masks_to_boxes, remove_small_regions
from samkit.masks.upscale import BlockMasks, Upscaler
from samkit.models.build import SamConfig, build_sam


@pytest.mark.parametrize("n, layers, scale", [(32, 0, 1), (16, 2, 2), (5, 1, 1)])
def test_point_grids_match_reference(n, layers, scale):
    from segment_anything.utils.amg import build_all_layer_point_grids

    ours = layer_point_grids(n, layers, scale)
    theirs = build_all_layer_point_grids(n, layers, scale)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("size", [(422, 640), (1000, 1500), (4000, 6000), (333, 101)])
@pytest.mark.parametrize("layers", [0, 1, 2])
def test_crop_boxes_match_reference(size, layers):
    from segment_anything.utils.amg import generate_crop_boxes

    boxes, layer_idx = generate_crop_boxes(size, layers, 512 / 1500)
    ours = crop_boxes(size, layers, 512 / 1500)
    assert [list(c.box) for c in ours] == boxes
    assert [c.layer for c in ours] == layer_idx


def _smooth_logits(n: int, size: int, seed: int) -> torch.Tensor:
    """Blob-like logits (n, size, size) in roughly [-20, 20] with some fine texture, like SAM's."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 1, 6, 6, generator=g) * 12
    fine = torch.randn(n, 1, size // 4, size // 4, generator=g) * 1.5
    x = F.interpolate(coarse, (size, size), mode="bicubic") + F.interpolate(
        fine, (size, size), mode="bilinear"
    )
    return x[:, 0]


def _reference_logits(low: torch.Tensor, model_size: int, input_size, original_size) -> torch.Tensor:
    up = F.interpolate(low[:, None], (model_size, model_size), mode="bilinear", align_corners=False)
    up = up[..., : input_size[0], : input_size[1]]
    return F.interpolate(up, original_size, mode="bilinear", align_corners=False)[:, 0]


@pytest.mark.parametrize(
    "low_res, model_size, input_size, original_size, block",
    [
        (256, 1024, (683, 1024), (1000, 1500), 32),
        (256, 1024, (675, 1024), (422, 640), 16),
        (256, 1024, (1024, 311), (1023, 311), 16),  # upscaling in one axis, not the other
        (64, 256, (169, 256), (422, 640), 8),  # a 256-input model: 64 x 64 low-res logits
    ],
)
def test_upscaler_matches_interpolation(low_res, model_size, input_size, original_size, block):
    low = _smooth_logits(6, low_res, seed=low_res + original_size[0])
    full = _reference_logits(low, model_size, input_size, original_size)
    up = Upscaler(model_size, low_res, input_size, original_size, block=block)
    thresholds = (1.0, -1.0, 0.0)
    counts, masks = up.count_and_mask(low, thresholds, 0.0)
    expected = torch.stack([(full > t).sum((1, 2)) for t in thresholds], 1)
    # Equal up to pixels within float rounding of a threshold (none or a handful).
    assert (counts - expected).abs().max() <= 2
    assert (counts == expected).float().mean() > 0.8

    ref_masks = full > 0
    np.testing.assert_array_equal(up.boxes(masks).numpy(), masks_to_boxes(ref_masks).numpy())
    which = torch.tensor([4, 0, 2])
    h, w = original_size
    dest = torch.zeros(3, w + 7, h + 5, dtype=torch.uint8)
    up.paste(masks, which, dest, 7, 5, colmajor=True)
    pasted = dest.transpose(1, 2).bool()
    assert not pasted[:, :5].any() and not pasted[:, :, :7].any()
    mismatch = (pasted[:, 5:, 7:] != ref_masks[which]).sum()
    assert mismatch <= 2
    # Only a small share of the pixels is computed one by one.
    assert masks.exact_bits.numel() < 0.5 * ref_masks.numel()

    # Row-major paste; and the masks regrouped (select, cat) and packed as the generator keeps them.
    rows = torch.zeros(3, h, w, dtype=torch.bool)
    up.paste(masks, which, rows)
    assert (rows != ref_masks[which]).sum() <= 2
    np.testing.assert_array_equal(rows.numpy(), pasted[:, 5:, 7:].numpy())
    regrouped = BlockMasks.cat(
        [masks.select(torch.tensor([4])).packed(), masks.select(torch.tensor([2, 0])).packed()]
    )
    assert regrouped.exact_bits.dtype == torch.uint8 and len(regrouped) == 3
    again = torch.zeros(3, h, w, dtype=torch.bool)
    up.paste(regrouped, torch.tensor([0, 2, 1]), again)
    np.testing.assert_array_equal(again.numpy(), rows.numpy())
    np.testing.assert_array_equal(up.boxes(regrouped).numpy(), up.boxes(masks)[[4, 2, 0]].numpy())

    # Areas and pixel lookups straight from the blocks (packed or not), as the full-size masks give them.
    areas = up.areas(masks)
    assert (areas - ref_masks.sum((1, 2))).abs().max() <= 2
    np.testing.assert_array_equal(up.areas(regrouped).numpy(), areas[[4, 2, 0]].numpy())
    g = torch.Generator().manual_seed(1)
    points = torch.rand(400, 2, generator=g) * torch.tensor([w, h]) - 0.25  # a few just off the image
    col = points[:, 0].floor().long().clamp(0, w - 1)
    row = points[:, 1].floor().long().clamp(0, h - 1)
    expected_inside = ref_masks[:, row, col]
    inside = up.contains(masks, points)
    assert inside.shape == (len(low), len(points))
    assert (inside != expected_inside).sum() <= 2
    assert inside.any() and not inside.all()
    np.testing.assert_array_equal(up.contains(regrouped, points).numpy(), inside[[4, 2, 0]].numpy())


def _blobs(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = F.interpolate(torch.from_numpy(rng.normal(size=(1, 1, h // 8, w // 8))), (h, w), mode="bilinear")
    return (noise[0, 0].numpy() > 0.3) | (rng.random((h, w)) > 0.995)


def _full_cleanup(mask: np.ndarray, area: int) -> tuple[np.ndarray, bool]:
    out, a = remove_small_regions(mask, area, "holes")
    out, b = remove_small_regions(out, area, "islands")
    return out, a or b


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("area", [20, 300])
def test_windowed_cleanup_matches_full_image(seed, area):
    h, w = 120, 160
    base = _blobs(h, w, seed)
    cases = [base]
    # A small object away from the edges, one touching an edge, one spanning the full width, and an
    # object with a hole whose box nearly fills the image.
    small = np.zeros((h, w), bool)
    small[40:70, 50:90] = base[40:70, 50:90] | True
    small[50:55, 60:64] = False
    cases.append(small)
    edge = np.zeros((h, w), bool)
    edge[0:30, 100:160] = True
    edge[10:13, 120:123] = False
    edge[50:52, 10:12] = True
    cases.append(edge)
    band = np.zeros((h, w), bool)
    band[30:80, :] = base[30:80, :] | (np.arange(w) % 40 < 3)
    cases.append(band)
    big = np.ones((h, w), bool)
    big[0, :] = False
    big[60:62, 70:72] = False
    cases.append(big)
    cases.append(np.zeros((h, w), bool))
    for mask in cases:
        got, changed = clean_mask(mask, area)
        want, want_changed = _full_cleanup(mask, area)
        assert changed == want_changed
        np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def tiny_model():
    """A tiny random ViT SAM on a 256 input (64 x 64 low-res logits): fast, and exercises other sizes."""
    torch.manual_seed(0)
    cfg = SamConfig("vit", embed_dim=32, depth=1, num_heads=1, global_attn_indexes=(0,), image_size=256)
    return build_sam(cfg)


def test_generator_records_and_output_modes(tiny_model, photo):
    kw = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    coco = samkit.MaskGenerator(tiny_model, output_mode="coco_rle", **kw).generate(photo)
    binary = samkit.MaskGenerator(tiny_model, output_mode="binary_mask", **kw).generate(photo)
    raw = samkit.MaskGenerator(tiny_model, output_mode="uncompressed_rle", **kw).generate(photo)
    h, w = photo.shape[:2]
    assert len(coco) == len(binary) == len(raw) == 48  # 16 points x 3 masks, nothing suppressed
    for c, b, r in zip(coco, binary, raw, strict=True):
        assert set(c) == {
            "segmentation",
            "area",
            "bbox",
            "predicted_iou",
            "point_coords",
            "stability_score",
            "crop_box",
        }
        mask = b["segmentation"]
        assert mask.shape == (h, w) and mask.dtype == bool
        rle = {"size": c["segmentation"]["size"], "counts": c["segmentation"]["counts"].encode()}
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), mask)
        assert sum(r["segmentation"]["counts"]) == h * w
        assert c["area"] == mask.sum() == sum(r["segmentation"]["counts"][1::2])
        x, y, bw, bh = c["bbox"]
        ys, xs = np.nonzero(mask)
        assert [x, y, x + bw, y + bh] == [xs.min(), ys.min(), xs.max(), ys.max()]
        assert c["crop_box"] == [0, 0, w, h]
        ((px, py),) = c["point_coords"]
        assert 0 <= px <= w and 0 <= py <= h


def test_generator_returns_hundreds_of_masks(tiny_model, photo):
    """300 masks (10 x 10 points x 3, nothing filtered): pycocotools' area() fails on >= 256 RLEs at once
    with numpy 2, so the areas are computed in chunks; each must still equal its mask's pixel count."""
    kw = dict(points_per_side=10, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    records = samkit.MaskGenerator(tiny_model, output_mode="coco_rle", **kw).generate(photo)
    assert len(records) == 300
    for r in records[::37]:
        rle = {"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()}
        assert r["area"] == int(mask_utils.decode(rle).sum())


def test_generator_threads_give_the_same_masks(tiny_model, photo):
    """With 2 torch threads the batches are decoded in 2 Python threads of 1 torch thread each: same
    masks (up to float rounding) as with 1 thread, and torch's thread count is restored."""
    kw = dict(
        points_per_side=8,
        points_per_batch=16,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        box_nms_thresh=1.0,
    )
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = samkit.MaskGenerator(tiny_model, **kw).generate(photo)
        torch.set_num_threads(2)
        threaded = samkit.MaskGenerator(tiny_model, **kw).generate(photo)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert len(serial) == len(threaded) > 50
    for a, b in zip(serial, threaded, strict=True):
        assert a["point_coords"] == b["point_coords"]
        assert abs(a["predicted_iou"] - b["predicted_iou"]) < 1e-4
        assert (a["segmentation"] != b["segmentation"]).sum() <= 2


def test_generate_leaves_torch_threads_of_other_threads_alone(tiny_model, photo, monkeypatch):
    """Only the generator's own worker threads run torch on one thread: the caller's count is unchanged
    after generate(), and a thread that starts torch work meanwhile (an embedding worker) gets torch's
    usual count, not 1 (setting torch's count process-wide made such a thread stay on one thread)."""
    kw = dict(points_per_side=8, points_per_batch=16, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    gen = samkit.MaskGenerator(tiny_model, **kw)
    workers, others = [], []
    process_batch = gen._process_batch

    def probe(*args):  # runs in the generator's worker threads
        workers.append(torch.get_num_threads())
        other = threading.Thread(target=lambda: others.append(torch.get_num_threads()))
        other.start()
        other.join()
        return process_batch(*args)

    monkeypatch.setattr(gen, "_process_batch", probe)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        gen.generate(photo)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert len(workers) == 4 and set(workers) == {1}  # 64 points in batches of 16, 1 torch thread each
    assert others == [2, 2, 2, 2]


@pytest.mark.parametrize("threads, pools", [(None, [2]), (1, []), (3, [3])])
def test_generator_threads_are_the_callers_choice(tiny_model, photo, monkeypatch, threads, pools):
    """threads: None follows the caller's torch thread count, 1 decodes in the calling thread; where a
    thread's own torch count cannot be set, batches run one after another in the calling thread."""
    from samkit.everything import generator

    sizes = []
    pool = generator.ThreadPoolExecutor

    def counted(n, **kwargs):
        sizes.append(n)
        return pool(n, **kwargs)

    monkeypatch.setattr(generator, "ThreadPoolExecutor", counted)
    kw = dict(points_per_side=8, points_per_batch=16, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    gen = samkit.MaskGenerator(tiny_model, threads=threads, **kw)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        records = gen.generate(photo)
        assert sizes == pools
        monkeypatch.setattr(generator, "can_limit_threads", lambda: False)
        sizes.clear()
        assert len(gen.generate(photo)) == len(records) > 0
        assert sizes == []
    finally:
        torch.set_num_threads(before)
    with pytest.raises(InputError, match="threads"):
        samkit.MaskGenerator(tiny_model, threads=0)


def test_generator_rejects_bad_options(tiny_model):
    with pytest.raises(InputError, match="exactly one"):
        samkit.MaskGenerator(tiny_model, points_per_side=None)
    with pytest.raises(InputError, match="exactly one"):
        samkit.MaskGenerator(tiny_model, point_grids=[np.zeros((4, 2))])
    with pytest.raises(InputError, match="output_mode"):
        samkit.MaskGenerator(tiny_model, output_mode="png")
    with pytest.raises(InputError, match="one \\(P, 2\\) array"):
        samkit.MaskGenerator(
            tiny_model, points_per_side=None, point_grids=[np.zeros((4, 2))], crop_n_layers=1
        )


def test_generator_reuses_an_embedded_predictor(tiny_model, photo):
    """generate(image, embedded=...) encodes only the extra crops and gives the same records."""
    kw = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, crop_n_layers=1)
    gen = samkit.MaskGenerator(tiny_model, output_mode="coco_rle", **kw)
    plain = gen.generate(photo)
    pred = samkit.Predictor(tiny_model)
    pred.set_image(photo)
    encodes = []
    hook = tiny_model.image_encoder.register_forward_hook(lambda *_: encodes.append(1))
    try:
        reused = gen.generate(photo, embedded=pred)
    finally:
        hook.remove()
    assert len(encodes) == len(crop_boxes(photo.shape[:2], 1, 512 / 1500)) - 1  # the 4 crops, not the image
    assert pred.is_image_set  # the caller's predictor keeps its image
    assert [r["segmentation"] for r in reused] == [r["segmentation"] for r in plain]
    with pytest.raises(InputError, match="not this"):
        gen.generate(photo[:100], embedded=pred)
    other = samkit.Predictor(build_sam(SamConfig("vit", embed_dim=32, depth=1, num_heads=1, image_size=256)))
    other.set_image(photo)
    with pytest.raises(InputError, match="this generator's model"):
        gen.generate(photo, embedded=other)


def test_generator_point_grids_and_crops(tiny_model, photo):
    grid = np.array([[0.25, 0.5], [0.75, 0.5]])
    gen = samkit.MaskGenerator(
        tiny_model,
        points_per_side=None,
        point_grids=[grid, grid],
        crop_n_layers=1,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        min_mask_region_area=50,
        output_mode="coco_rle",
    )
    records = gen.generate(photo)
    h, w = photo.shape[:2]
    crops = {tuple(b) for b in (c.box for c in crop_boxes((h, w), 1, 512 / 1500))}
    assert records
    for r in records:
        x, y, cw, ch = r["crop_box"]
        assert (x, y, x + cw, y + ch) in crops
        assert r["segmentation"]["size"] == [h, w]


def test_generator_progress_counts_every_prompt_batch_of_every_crop(tiny_model, photo, capsys, monkeypatch):
    import tqdm

    from samkit.everything import generator as generator_module

    closed: list[tuple[int, int]] = []

    class Recording(tqdm.tqdm):
        def close(self) -> None:
            if not self.disable:
                closed.append((self.total, self.n))
            super().close()

    monkeypatch.setattr(generator_module, "tqdm", Recording)
    # 1 crop of 8 x 8 points + 4 crops of 4 x 4 (downscale 2), 16 per batch: 4 + 4 x 1 = 8 batches.
    kw = dict(points_per_side=8, points_per_batch=16, crop_n_layers=1, crop_n_points_downscale_factor=2)
    gen = samkit.MaskGenerator(tiny_model, **kw)
    quiet = gen.generate(photo)
    assert "prompt batches" not in capsys.readouterr().err and not closed
    shown = gen.generate(photo, progress=True)
    assert "prompt batches" in capsys.readouterr().err
    assert closed == [(8, 8)]
    assert len(shown) == len(quiet)


def test_run_local_shows_per_image_bars_only_on_a_terminal(tiny_model, photo, tmp_path, capsys, monkeypatch):
    from PIL import Image

    from samkit.engine.local import run_local

    Image.fromarray(photo).save(tmp_path / "a.png")
    gen = samkit.MaskGenerator(tiny_model, points_per_side=4, points_per_batch=8)
    run_local([tmp_path / "a.png"], gen, tmp_path / "piped")
    err = capsys.readouterr().err
    assert "everything" in err and "prompt batches" not in err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    run_local([tmp_path / "a.png"], gen, tmp_path / "tty")
    assert "prompt batches" in capsys.readouterr().err
