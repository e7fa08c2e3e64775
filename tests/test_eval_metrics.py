import numpy as np
import pytest
from pycocotools import mask as mask_utils

from samkit.eval.metrics import (
    BoundaryCounts,
    average_recall,
    best_proposal_ious,
    boundary_counts,
    boundary_summary,
    iou,
    noc,
    recall_at_precision,
    size_bucket,
)


def _rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _rle(m):
    return mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))


def test_iou_known_value():
    a = _rect(10, 10, 0, 4, 0, 4)  # 16 px
    b = _rect(10, 10, 2, 6, 0, 4)  # 16 px, overlap 8
    assert iou(a, b) == pytest.approx(8 / 24)


def test_iou_excludes_ignore_pixels():
    gt = _rect(10, 10, 0, 4, 0, 4)
    pred = _rect(10, 10, 0, 5, 0, 5)  # 9 extra pixels on a 1-px band around gt
    band = pred & ~gt
    assert iou(pred, gt) == pytest.approx(16 / 25)
    assert iou(pred, gt, ignore=band) == 1.0
    # an object pixel in the ignore band is not a miss either
    assert iou(gt & ~_rect(10, 10, 0, 1, 0, 4), gt, ignore=_rect(10, 10, 0, 1, 0, 4)) == 1.0


def test_iou_both_empty_is_one():
    z = np.zeros((3, 3), dtype=bool)
    assert iou(z, z) == 1.0


def test_noc_counts_first_click_reaching_threshold_and_failures():
    assert noc([0.5, 0.86, 0.91], 0.85) == 2
    assert noc([0.5, 0.86, 0.91], 0.90) == 3
    assert noc([0.95], 0.9) == 1
    assert noc([0.5] * 20, 0.9, max_clicks=20) == 20
    assert noc([0.5, 0.5, 0.95], 0.9, max_clicks=2) == 2


def test_size_buckets_follow_coco():
    assert size_bucket(32**2 - 1) == "small"
    assert size_bucket(32**2) == "medium"
    assert size_bucket(96**2 - 1) == "medium"
    assert size_bucket(96**2) == "large"


def test_average_recall_with_hand_made_proposals():
    gt_a = _rect(20, 20, 0, 10, 0, 10)  # 100 px
    gt_b = _rect(20, 20, 10, 20, 10, 20)
    exact_a = gt_a.copy()
    half_b = _rect(20, 20, 10, 20, 10, 15)  # IoU 0.5 with gt_b
    best = best_proposal_ious([_rle(gt_a), _rle(gt_b)], [_rle(half_b), _rle(exact_a)])
    np.testing.assert_allclose(best, [1.0, 0.5])
    # gt_a is recalled at all 10 thresholds, gt_b only at 0.5: (10 + 1) / 20
    assert average_recall(best) == pytest.approx(11 / 20)
    # the budget cuts the proposal list: only the first proposal counts
    np.testing.assert_allclose(best_proposal_ious([_rle(gt_a), _rle(gt_b)], [_rle(half_b)]), [0.0, 0.5])
    np.testing.assert_allclose(best_proposal_ious([_rle(gt_a)], []), [0.0])


def _lines(h=60, w=80):
    """Two straight one-pixel edges that thinning leaves as they are (no corners to trim)."""
    m = np.zeros((h, w), dtype=bool)
    m[10, 10:70] = True  # 60 px
    m[20:50, 40] = True  # 30 px
    return m


def test_boundary_perfect_and_shifted_and_partial():
    gt = _lines()
    thresholds = np.array([0.25, 0.75])
    perfect = boundary_counts(gt.astype(float), [gt], thresholds)
    np.testing.assert_array_equal(perfect.sum_r, [90, 90])
    # The benchmark's assignment is approximate and randomised (as in BSDS): allow a pixel or two.
    np.testing.assert_allclose(perfect.count_r, perfect.sum_r, rtol=0.03)
    np.testing.assert_allclose(perfect.count_p, perfect.sum_p, rtol=0.03)
    summary = boundary_summary([perfect])
    assert summary["ODS"] == pytest.approx(1.0, abs=0.03) and summary["OIS"] == pytest.approx(1.0, abs=0.03)
    assert summary["R50"] == pytest.approx(1.0, abs=0.03)

    # Shifted 2 px down: beyond the default tolerance (0.0075 x diagonal 100 = 0.75 px), within 0.03 x 100.
    shifted = np.roll(gt, 2, axis=0).astype(float)
    wide = boundary_counts(shifted, [gt], thresholds, max_dist=0.03)
    assert boundary_summary([wide])["ODS"] == pytest.approx(1.0, abs=0.03)
    assert boundary_summary([boundary_counts(shifted, [gt], thresholds)])["ODS"] < 0.5

    # Predicting only the horizontal edge: precision 1, recall 60 / 90.
    top = np.zeros_like(gt)
    top[10, 10:70] = True
    c = boundary_counts(top.astype(float), [gt], thresholds)
    assert c.sum_p[0] == 60 and c.count_p[0] == pytest.approx(60, abs=2)
    assert c.sum_r[0] == 90 and c.count_r[0] == pytest.approx(60, abs=2)
    assert boundary_summary([c])["ODS"] == pytest.approx(2 * (60 / 90) / (1 + 60 / 90), abs=0.03)

    # Below the lowest threshold nothing is predicted: recall 0.
    weak = boundary_counts(gt * 0.1, [gt], thresholds)
    np.testing.assert_array_equal(weak.sum_p, [0, 0])
    assert boundary_summary([weak])["ODS"] == 0.0


def test_boundary_summary_pools_counts_over_images_and_annotators():
    # Two annotators: recall counts sum over both, precision counts a pixel once.
    gt = _lines()
    other = np.zeros_like(gt)
    other[10, 10:70] = True
    c = boundary_counts(gt.astype(float), [gt, other], np.array([0.5]))
    assert c.sum_r[0] == 150 and c.count_r[0] == pytest.approx(150, abs=3)
    assert c.sum_p[0] == 90 and c.count_p[0] == pytest.approx(90, abs=2)

    a = BoundaryCounts(
        np.array([8.0, 4.0]), np.array([10.0, 10.0]), np.array([8.0, 4.0]), np.array([10.0, 4.0])
    )
    b = BoundaryCounts(
        np.array([2.0, 2.0]), np.array([10.0, 10.0]), np.array([2.0, 2.0]), np.array([10.0, 2.0])
    )
    s = boundary_summary([a, b])
    # OIS pools a at threshold 0 (F .8) and b at threshold 1 (P 1, R .2): R 10/20, P 10/12
    assert s["OIS"] == pytest.approx(2 * (10 / 12) * 0.5 / (10 / 12 + 0.5))
    # the dataset-wide curve: (R .5, P .5) then (R .3, P 1); ODS >= the better end point (F .5)
    assert s["ODS"] >= 0.5 - 1e-12
    assert 0 < s["AP"] <= 1


def test_recall_at_precision_interpolates():
    rec = np.array([1.0, 0.5, 0.0])
    prec = np.array([0.25, 0.75, 1.0])
    assert recall_at_precision(rec, prec, 0.5) == pytest.approx(0.75)
    assert recall_at_precision(rec, prec, 1.1) == 0.0
