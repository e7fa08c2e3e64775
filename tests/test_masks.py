"""samkit.masks against the reference implementation (segment_anything/utils/amg.py) and torchvision's NMS."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import REFSHIM
from pycocotools import mask as mask_utils

from samkit.errors import InputError
from samkit.masks import (
    batched_nms,
    box_iou,
    box_xyxy_to_xywh,
    coco_encode_rle,
    is_box_near_crop_edge,
    mask_iou,
    mask_to_rle,
    masks_to_boxes,
    masks_to_coco_rle,
    remove_small_regions,
    rle_area,
    rle_to_mask,
    stability_score,
    to_coco_rle,
)

# conftest puts ../shared/refshim (torchvision's NMS and the references' helpers) first on sys.path.
_MISSING = f"needs {REFSHIM} (reference stand-ins): missing"
amg = pytest.importorskip("segment_anything.utils.amg", reason=_MISSING)
ref_boxes = pytest.importorskip("torchvision.ops.boxes", reason=_MISSING)


def blobs(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """n masks made of a few random rectangles and noise: realistic runs plus ragged edges."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n):
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            y0, dy = (int(v) for v in torch.randint(0, h, (2,), generator=g))
            x0, dx = (int(v) for v in torch.randint(0, w, (2,), generator=g))
            masks[i, y0 : y0 + dy + 1, x0 : x0 + dx + 1] = True
    noise = torch.rand(n, h, w, generator=g) < 0.02
    return masks ^ noise


@pytest.fixture
def masks() -> torch.Tensor:
    m = blobs(12, 37, 53, seed=0)
    m[0] = False
    m[1] = True
    m[2] = False
    m[2, 0, 0] = True  # a mask that starts with foreground
    m[3] = False
    m[3, -1, -1] = True  # and one that ends with it
    return m


def test_stability_score_matches_reference():
    logits = torch.randn(4, 3, 40, 50) * 3
    ours = stability_score(logits, 0.0, 1.0)
    ref = amg.calculate_stability_score(logits, 0.0, 1.0)
    assert ours.shape == (4, 3)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_stability_score_torch_path_matches_reference():
    # bfloat16 takes the torch (non-numpy) path, the one accelerators use.
    logits = (torch.randn(3, 40, 50) * 3).bfloat16()
    ref = amg.calculate_stability_score(logits, 0.0, 1.0)
    torch.testing.assert_close(stability_score(logits, 0.0, 1.0), ref, rtol=0, atol=0)


def test_stability_score_nan_when_empty_and_one_when_saturated():
    logits = torch.stack([torch.full((8, 8), -10.0), torch.full((8, 8), 10.0)])
    score = stability_score(logits, 0.0, 1.0)
    assert torch.isnan(score[0]) and score[1] == 1.0


def test_masks_to_boxes_matches_reference(masks):
    ours = masks_to_boxes(masks)
    ref = amg.batched_mask_to_box(masks)
    assert ours.shape == (12, 4)
    assert torch.equal(ours, ref)
    assert torch.equal(ours[0], torch.zeros(4, dtype=torch.int64))
    assert ours[1].tolist() == [0, 0, 52, 36]
    assert ours[2].tolist() == [0, 0, 0, 0] and ours[3].tolist() == [52, 36, 52, 36]
    # Any leading shape, and a single (H, W) mask.
    assert torch.equal(masks_to_boxes(masks.view(3, 4, 37, 53)), ref.view(3, 4, 4))
    assert torch.equal(masks_to_boxes(masks[5]), ref[5])
    assert masks_to_boxes(torch.zeros(0, 5, 5, dtype=torch.bool)).shape == (0, 4)
    transposed = masks.transpose(1, 2)  # a non-contiguous view
    assert torch.equal(masks_to_boxes(transposed), amg.batched_mask_to_box(transposed.contiguous()))


def test_box_iou_by_hand():
    a = torch.tensor([[0, 0, 10, 10], [0, 0, 0, 0]])
    b = torch.tensor([[5, 0, 15, 10], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 0, 0]])
    iou = box_iou(a, b)
    assert iou.shape == (2, 4)
    # 50 shared of 150; itself; disjoint; two empty boxes have no union and count as 0, not NaN.
    np.testing.assert_allclose(iou[0].numpy(), [50 / 150, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(iou[1].numpy(), [0.0, 0.0, 0.0, 0.0])


def test_box_xyxy_to_xywh():
    boxes = torch.tensor([[1, 2, 5, 9], [0, 0, 0, 0]])
    assert box_xyxy_to_xywh(boxes).tolist() == [[1, 2, 4, 7], [0, 0, 0, 0]]
    assert torch.equal(box_xyxy_to_xywh(boxes[0]), amg.box_xyxy_to_xywh(boxes[0]))
    assert boxes[0].tolist() == [1, 2, 5, 9]


def test_is_box_near_crop_edge_matches_reference():
    g = torch.Generator().manual_seed(1)
    boxes = torch.randint(0, 300, (200, 2), generator=g)
    boxes = torch.cat([boxes, boxes + torch.randint(0, 300, (200, 2), generator=g)], 1).float()
    for crop in ([0, 0, 600, 400], [100, 50, 400, 350], [300, 0, 600, 300]):
        ours = is_box_near_crop_edge(boxes, crop, [0, 0, 600, 400])
        ref = amg.is_box_near_crop_edge(boxes, crop, [0, 0, 600, 400])
        assert torch.equal(ours, ref)
    assert not is_box_near_crop_edge(boxes, [0, 0, 600, 400], [0, 0, 600, 400]).any()


def test_mask_to_rle_equals_reference(masks):
    ours = mask_to_rle(masks)
    assert ours == amg.mask_to_rle_pytorch(masks)
    assert all(isinstance(c, int) for r in ours for c in r["counts"])
    assert ours[0]["counts"] == [37 * 53] and ours[1]["counts"] == [0, 37 * 53]
    assert ours[2]["counts"] == [0, 1, 37 * 53 - 1]


def test_mask_to_rle_random_noise_equals_reference():
    m = torch.rand(5, 16, 24, generator=torch.Generator().manual_seed(3)) < 0.5
    assert mask_to_rle(m) == amg.mask_to_rle_pytorch(m)
    assert mask_to_rle(m[:0]) == []


def test_rle_round_trips_and_area(masks):
    for mask, rle in zip(masks, mask_to_rle(masks), strict=True):
        decoded = rle_to_mask(rle)
        assert decoded.dtype == bool and decoded.shape == (37, 53)
        assert np.array_equal(decoded, amg.rle_to_mask(rle))
        assert np.array_equal(decoded, mask.numpy())
        assert rle_area(rle) == amg.area_from_rle(rle) == int(mask.sum())
        coco = coco_encode_rle(rle)
        assert coco == amg.coco_encode_rle(rle)
        assert isinstance(coco["counts"], str)
        assert np.array_equal(rle_to_mask(coco), mask.numpy())
        assert rle_area(coco) == int(mask.sum())


def test_rle_to_mask_rejects_corrupt_counts():
    with pytest.raises(InputError, match="corrupt"):
        rle_to_mask({"size": [4, 4], "counts": [3, 2]})


def test_masks_to_coco_rle_matches_per_mask_encoding(masks):
    expected = [amg.coco_encode_rle(r) for r in amg.mask_to_rle_pytorch(masks)]
    assert masks_to_coco_rle(masks) == expected
    assert masks_to_coco_rle(masks.numpy()) == expected
    decoded = mask_utils.decode([{**r, "counts": r["counts"].encode()} for r in expected])
    assert np.array_equal(decoded.transpose(2, 0, 1).astype(bool), masks.numpy())
    assert masks_to_coco_rle(np.zeros((0, 4, 4), dtype=bool)) == []


def test_to_coco_rle_accepts_every_form(masks):
    coco = masks_to_coco_rle(masks[4:5])[0]
    assert to_coco_rle(masks[4]) == coco
    assert to_coco_rle(masks[4].numpy()) == coco
    assert to_coco_rle(mask_to_rle(masks[4:5])[0]) == coco
    assert to_coco_rle({**coco, "counts": coco["counts"].encode()}) == coco
    with pytest.raises(InputError):
        to_coco_rle([1, 2, 3])


@pytest.mark.parametrize("mode", ["holes", "islands"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_remove_small_regions_matches_reference(mode, seed):
    m = blobs(1, 64, 64, seed=seed)[0].numpy()
    for thresh in (0, 3, 20, 500, 10_000):
        ours, changed = remove_small_regions(m, thresh, mode)
        ref, ref_changed = amg.remove_small_regions(m, thresh, mode)
        assert changed == ref_changed
        assert ours.dtype == bool
        assert np.array_equal(ours, ref)


def test_remove_small_regions_edge_cases():
    empty = np.zeros((10, 10), dtype=bool)
    assert remove_small_regions(empty, 5, "islands") == (empty, False)
    full = np.ones((10, 10), dtype=bool)
    assert remove_small_regions(full, 5, "holes") == (full, False)
    two = np.zeros((10, 10), dtype=bool)
    two[0:2, 0:2] = True
    two[5:8, 5:8] = True
    # Every island is below the threshold: the largest one is kept.
    kept, changed = remove_small_regions(two, 100, "islands")
    assert changed and kept.sum() == 9 and kept[5:8, 5:8].all()
    holed = full.copy()
    holed[4, 4] = False
    assert remove_small_regions(holed, 2, "holes")[0].all()
    with pytest.raises(InputError):
        remove_small_regions(two, 5, "both")


def random_boxes(n: int, seed: int, ties: bool = False):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 200
    wh = torch.rand(n, 2, generator=g) * 60 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(n, generator=g)
    if ties:
        scores = (scores * 5).floor()  # many equal scores
        boxes[n // 2 :] = boxes[: n - n // 2]  # exact duplicate boxes
    idxs = torch.randint(0, 3, (n,), generator=g)
    return boxes, scores, idxs


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("thresh", [0.0, 0.3, 0.7])
def test_batched_nms_matches_torchvision_semantics(seed, ties, thresh):
    boxes, scores, idxs = random_boxes(400, seed, ties)
    ours = batched_nms(boxes, scores, idxs, thresh)
    ref = ref_boxes.batched_nms(boxes, scores, idxs, thresh)
    assert ours.dtype == torch.int64
    assert torch.equal(ours, ref)
    # Kept in descending score order.
    assert (scores[ours][1:] <= scores[ours][:-1]).all()


def test_batched_nms_long_suppression_chain():
    # Boxes sliding one pixel at a time: each overlaps its neighbour, so the greedy answer alternates
    # along the whole chain, the worst case for the iterative pass.
    n = 300
    x = torch.arange(n, dtype=torch.float32) * 2
    boxes = torch.stack([x, torch.zeros(n), x + 10, torch.full((n,), 10.0)], 1)
    scores = torch.linspace(1, 0, n)
    idxs = torch.zeros(n, dtype=torch.int64)
    ours = batched_nms(boxes, scores, idxs, 0.5)
    assert torch.equal(ours, ref_boxes.batched_nms(boxes, scores, idxs, 0.5))


def test_batched_nms_edge_cases():
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).numel() == 0
    one = batched_nms(torch.tensor([[0.0, 0, 5, 5]]), torch.tensor([0.3]), torch.tensor([0]), 0.5)
    assert one.tolist() == [0]
    # Same box in two categories: both stay; in one category: the higher score stays.
    boxes = torch.tensor([[0.0, 0, 5, 5], [0.0, 0, 5, 5]])
    scores = torch.tensor([0.2, 0.9])
    assert batched_nms(boxes, scores, torch.tensor([0, 1]), 0.5).tolist() == [1, 0]
    assert batched_nms(boxes, scores, torch.tensor([0, 0]), 0.5).tolist() == [1]
    # Integer boxes are accepted.
    assert batched_nms(boxes.long(), scores, torch.tensor([0, 0]), 0.5).tolist() == [1]


def test_mask_iou():
    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    a[0, :2] = True
    b = torch.zeros(3, 4, 4, dtype=torch.bool)
    b[0, :2] = True
    b[1, :, :2] = True
    iou = mask_iou(a, b)
    assert iou.shape == (2, 3)
    torch.testing.assert_close(iou[0], torch.tensor([1.0, 4 / 12, 0.0]))
    assert (iou[1] == 0).all()
