import numpy as np
import pytest

from samkit.eval.clicks import Click, first_click, next_click


def test_first_click_is_deepest_interior_point():
    gt = np.zeros((9, 12), dtype=bool)
    gt[1:8, 2:9] = True  # 7x7 square, centre (x=5, y=4)
    assert first_click(gt) == Click(5, 4, True)


def test_first_click_ties_break_row_major_and_border_counts_as_boundary():
    gt = np.ones((4, 6), dtype=bool)  # the whole image: the frame is the boundary
    # distance 2 is reached at rows 1-2, columns 1-4; the first in row-major order is (x=1, y=1)
    assert first_click(gt) == Click(1, 1, True)


def test_first_click_skips_ignored_pixels_and_rejects_empty_objects():
    gt = np.zeros((9, 9), dtype=bool)
    gt[1:8, 1:8] = True
    ignore = np.zeros_like(gt)
    ignore[1:8, 1:4] = True
    click = first_click(gt, ignore)
    assert not ignore[click.y, click.x] and gt[click.y, click.x]
    # columns 4-7 remain: distance 2 at x = 5, 6 (rows 2-6); first in row-major order
    assert click == Click(5, 2, True)
    with pytest.raises(ValueError):
        first_click(np.zeros((3, 3), dtype=bool))


def test_next_click_positive_in_larger_false_negative_region():
    gt = np.zeros((20, 20), dtype=bool)
    gt[2:18, 2:18] = True
    pred = gt.copy()
    pred[2:18, 10:18] = False  # 16x8 missed block, inscribed distance 4
    pred[0:2, 0:3] = True  # small false positive
    # distance 4 at x = 13, 14 on rows 5-14; the first in row-major order
    assert next_click(pred, gt) == Click(13, 5, True)


def test_next_click_negative_in_larger_false_positive_region():
    gt = np.zeros((20, 20), dtype=bool)
    gt[0:4, 0:4] = True
    pred = gt.copy()
    pred[8:17, 8:17] = True  # 9x9 false positive, centre (12, 12)
    pred[0, 0] = False  # one missed pixel
    assert next_click(pred, gt) == Click(12, 12, False)


def test_next_click_ignores_errors_in_ignore_band_and_stops_when_perfect():
    gt = np.zeros((10, 10), dtype=bool)
    gt[2:8, 2:8] = True
    pred = gt.copy()
    pred[1, 1:9] = True  # false positives, all inside the ignore band
    ignore = np.zeros_like(gt)
    ignore[1, :] = True
    assert next_click(pred, gt, ignore) is None
    assert next_click(gt, gt) is None


def test_next_click_on_empty_prediction_equals_first_click():
    gt = np.zeros((15, 11), dtype=bool)
    gt[3:12, 1:9] = True
    assert next_click(np.zeros_like(gt), gt) == first_click(gt)
