"""Scores of the paper's protocols: mask IoU with ignore regions, NoC, proposal AR, BSDS boundary F.

Masks are (H, W) bool arrays in original-image pixels. Boundary maps are (H, W) float arrays in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils

# COCO's size buckets, on mask area in pixels.
SMALL_AREA = 32**2
LARGE_AREA = 96**2
AR_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
# The BSDS benchmark's 99 thresholds and matching tolerance (fraction of the image diagonal).
BSDS_THRESHOLDS = np.linspace(1.0 / 100, 1.0 - 1.0 / 100, 99)
BSDS_MAX_DIST = 0.0075


def iou(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """IoU of two (H, W) bool masks over the pixels outside `ignore` (1.0 when both are empty there)."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if ignore is not None:
        valid = ~np.asarray(ignore, dtype=bool)
        pred = pred & valid
        gt = gt & valid
    union = int(np.count_nonzero(pred | gt))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(pred & gt)) / union


def noc(ious: Sequence[float], threshold: float, max_clicks: int = 20) -> int:
    """Number of clicks to reach `threshold` IoU; `ious[k]` is the IoU after k + 1 clicks.

    An object that never reaches it within `max_clicks` counts `max_clicks` (the RITM convention).
    """
    for k, value in enumerate(ious[:max_clicks]):
        if value >= threshold:
            return k + 1
    return max_clicks


def size_bucket(area: float) -> str:
    """COCO's size name for a mask of `area` pixels: small (< 32^2), medium (< 96^2) or large."""
    if area < SMALL_AREA:
        return "small"
    if area < LARGE_AREA:
        return "medium"
    return "large"


def best_proposal_ious(gt_rles: list[dict], proposal_rles: list[dict]) -> np.ndarray:
    """(G,) IoU of each ground-truth mask with its best-matching proposal (0 with no proposals).

    Both lists hold COCO RLEs of one image; proposals should already be cut to the budget (e.g. top 100).
    """
    if not gt_rles:
        return np.zeros(0)
    if not proposal_rles:
        return np.zeros(len(gt_rles))
    ious = np.asarray(mask_utils.iou(proposal_rles, gt_rles, [0] * len(gt_rles)), dtype=np.float64)
    return ious.reshape(len(proposal_rles), len(gt_rles)).max(axis=0)


def average_recall(best_ious: np.ndarray) -> float:
    """Recall averaged over IoU thresholds 0.5:0.05:0.95, from each GT's best proposal IoU (nan if none)."""
    best_ious = np.asarray(best_ious, dtype=np.float64)
    if best_ious.size == 0:
        return float("nan")
    return float(np.mean([(best_ious >= t).mean() for t in AR_IOU_THRESHOLDS]))


@dataclass
class BoundaryCounts:
    """Matched/total edge pixel counts of one image at each threshold, as the BSDS benchmark keeps them.

    count_r: (T,) GT boundary pixels matched, summed over annotators; sum_r: (T,) GT boundary pixels;
    count_p: (T,) predicted pixels matched to any annotator; sum_p: (T,) predicted pixels.
    """

    count_r: np.ndarray
    sum_r: np.ndarray
    count_p: np.ndarray
    sum_p: np.ndarray


def boundary_counts(
    edges: np.ndarray,
    gt_boundaries: Sequence[np.ndarray],
    thresholds: np.ndarray = BSDS_THRESHOLDS,
    max_dist: float = BSDS_MAX_DIST,
) -> BoundaryCounts:
    """BSDS correspondence of an (H, W) edge map in [0, 1] against each annotator's (H, W) bool boundaries.

    At each threshold the binarised map is thinned to one-pixel edges and matched to every annotator with
    the benchmark's min-cost assignment (pyEdgeEval's port of `correspondPixels`), tolerance `max_dist` x
    the image diagonal. A predicted pixel is correct if it matches any annotator.
    """
    from pyEdgeEval._lib import correspond_pixels
    from pyEdgeEval.preprocess import binary_thin

    n = len(thresholds)
    out = BoundaryCounts(np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n))
    gts = [np.asarray(g, dtype=bool) for g in gt_boundaries]
    for i, t in enumerate(thresholds):
        pred = edges >= t
        if pred.any():
            pred = binary_thin(pred)
        matched_pred = np.zeros(pred.shape, dtype=bool)
        for gt in gts:
            if pred.any() and gt.any():
                match_pred, match_gt, _, _ = correspond_pixels(pred, gt, max_dist=max_dist)
                matched_pred |= match_pred > 0
                out.count_r[i] += np.count_nonzero(match_gt > 0)
            out.sum_r[i] += np.count_nonzero(gt)
        out.count_p[i] = np.count_nonzero(matched_pred)
        out.sum_p[i] = np.count_nonzero(pred)
    return out


def _prf(count_r, sum_r, count_p, sum_p):
    """Recall, precision, F as the BSDS benchmark defines them (0 where a denominator is 0)."""
    count_r, sum_r, count_p, sum_p = (
        np.asarray(a, dtype=np.float64) for a in (count_r, sum_r, count_p, sum_p)
    )
    rec = count_r / (sum_r + (sum_r == 0))
    prec = count_p / (sum_p + (sum_p == 0))
    f = 2 * prec * rec / (prec + rec + ((prec + rec) == 0))
    return rec, prec, f


def _interpolated_best_f(rec: np.ndarray, prec: np.ndarray) -> tuple[float, int]:
    """Best F along the PR curve with linear interpolation between thresholds (BSDS `fmeasure`/`maxF`)."""
    best, best_i = -1.0, 0
    d = np.linspace(0, 1, 101)
    for i in range(len(rec)):
        if i == 0:
            r, p = rec[:1], prec[:1]
        else:
            r = rec[i] * d + rec[i - 1] * (1 - d)
            p = prec[i] * d + prec[i - 1] * (1 - d)
        f = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)
        if f.max() > best:
            best, best_i = float(f.max()), i
    return best, best_i


def boundary_summary(per_image: Sequence[BoundaryCounts]) -> dict[str, float]:
    """ODS F, OIS F, AP and R50 over images, as the BSDS benchmark aggregates them.

    ODS: best F of the dataset-wide PR curve (one threshold for all images, interpolated between
    thresholds). OIS: counts pooled at each image's own best threshold. AP: area under the PR curve,
    precision interpolated at recall 0:0.01:1 (zero outside the curve). R50: recall at 50% precision.
    """
    if not per_image:
        return {"ODS": float("nan"), "OIS": float("nan"), "AP": float("nan"), "R50": float("nan")}
    cr = sum(c.count_r for c in per_image)
    sr = sum(c.sum_r for c in per_image)
    cp = sum(c.count_p for c in per_image)
    sp = sum(c.sum_p for c in per_image)
    rec, prec, _ = _prf(cr, sr, cp, sp)
    ods, _ = _interpolated_best_f(rec, prec)

    best = np.zeros(4)
    for c in per_image:
        _, _, f = _prf(c.count_r, c.sum_r, c.count_p, c.sum_p)
        k = int(np.argmax(f))
        best += [c.count_r[k], c.sum_r[k], c.count_p[k], c.sum_p[k]]
    _, _, ois = _prf(*best)

    order = np.argsort(rec, kind="stable")
    r_sorted, idx = np.unique(rec[order], return_index=True)
    p_sorted = prec[order][idx]
    if len(r_sorted) > 1:
        grid = np.linspace(0, 1, 101)
        p_grid = np.interp(grid, r_sorted, p_sorted, left=np.nan, right=np.nan)
        ap = float(np.nansum(p_grid) / 100)
    else:
        ap = 0.0

    return {"ODS": ods, "OIS": float(ois), "AP": ap, "R50": recall_at_precision(rec, prec, 0.5)}


def recall_at_precision(rec: np.ndarray, prec: np.ndarray, target: float) -> float:
    """Highest recall on the piecewise-linear PR curve where precision >= `target` (0 if never)."""
    best = 0.0
    for i in range(len(rec)):
        if prec[i] >= target:
            best = max(best, float(rec[i]))
        if i == 0:
            continue
        p0, p1, r0, r1 = prec[i - 1], prec[i], rec[i - 1], rec[i]
        if (p0 - target) * (p1 - target) < 0:
            a = (target - p0) / (p1 - p0)
            best = max(best, float(r0 + a * (r1 - r0)))
    return best
