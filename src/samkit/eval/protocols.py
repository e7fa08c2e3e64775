"""The paper's zero-shot protocols, one function per protocol and item, plus their summaries.

Any object with `set_image(image)` and `predict(point_coords, point_labels, box, mask_input,
multimask_output)` (the `PromptModel` protocol: samkit's Predictor, the reference SamPredictor, the GrabCut
baseline) can be measured. Points are (x, y) and boxes XYXY in original-image pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils

from samkit.eval.clicks import first_click, next_click
from samkit.eval.datasets import EdgeItem, ImageItem, ObjectItem
from samkit.eval.metrics import (
    BoundaryCounts,
    average_recall,
    best_proposal_ious,
    boundary_counts,
    boundary_summary,
    iou,
    noc,
    size_bucket,
)
from samkit.masks.upscale import interpolate_logits


class PromptModel(Protocol):
    """What the protocols need from a model: SamPredictor's `set_image` / `predict` (samkit's predictors,
    the reference's, `GrabCut`). `predict` is called with the keywords point_coords (N, 2) XY pixels,
    point_labels (N,), box (4,) XYXY, mask_input (1, 256, 256) low-res logits and multimask_output, and
    returns masks, scores and low-res logits as numpy arrays or torch tensors (see `_predict`)."""

    def set_image(self, image: Any) -> None: ...

    def predict(self, *args: Any, **prompts: Any) -> tuple[Any, Any, Any]: ...


def _predict(model: PromptModel, **kwargs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    masks, scores, logits = model.predict(**kwargs)
    return tuple(
        x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        for x in (masks, scores, logits)
    )


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


# --- single point -----------------------------------------------------------------------------------


def single_point(model: PromptModel, item: ObjectItem) -> dict[str, Any]:
    """One positive click at the object's deepest interior point. The image must already be set.

    Returns the IoU of the top-scored of the 3 masks, of the best of the 3 (oracle), and of the single-mask
    output (`multimask_output=False`), with the click.
    """
    click = first_click(item.mask, item.ignore)
    coords, labels = np.array([[click.x, click.y]], dtype=np.float64), np.array([1])
    masks, scores, _ = _predict(model, point_coords=coords, point_labels=labels, multimask_output=True)
    ious = [iou(m, item.mask, item.ignore) for m in masks]
    single, _, _ = _predict(model, point_coords=coords, point_labels=labels, multimask_output=False)
    return {
        "click": [click.x, click.y],
        "iou_top": ious[int(np.argmax(scores))],
        "iou_oracle": max(ious),
        "iou_single": iou(single[0], item.mask, item.ignore),
    }


def summarize_single_point(results: list[dict[str, Any]]) -> dict[str, float]:
    return {
        "mIoU_top": _mean([r["iou_top"] for r in results]),
        "mIoU_oracle": _mean([r["iou_oracle"] for r in results]),
        "mIoU_single": _mean([r["iou_single"] for r in results]),
    }


# --- clicks -------------------------------------------------------------------------------------------


def clicks(model: PromptModel, item: ObjectItem, max_clicks: int = 20) -> dict[str, Any]:
    """The interactive protocol: up to `max_clicks` simulated clicks. The image must already be set.

    Click 1 uses the 3-mask output and keeps the top-scored mask (one click is ambiguous); later clicks use
    the single-mask output, which SAM's authors recommend once the prompt is unambiguous. Every call gets
    all clicks so far and the previous chosen mask's low-res logits as `mask_input`. All `max_clicks`
    clicks are always simulated (no early stop) so the IoU curve is complete. Returns IoU after each click.
    """
    points: list[list[float]] = []
    labels: list[int] = []
    prev_logits = None
    pred = np.zeros_like(item.mask)
    ious: list[float] = []
    for k in range(max_clicks):
        click = next_click(pred, item.mask, item.ignore)
        if click is None:
            # A perfect mask has nothing left to correct; it stays the answer for the remaining clicks.
            ious.extend([ious[-1] if ious else 1.0] * (max_clicks - k))
            break
        points.append([click.x, click.y])
        labels.append(1 if click.positive else 0)
        multimask = k == 0
        masks, scores, logits = _predict(
            model,
            point_coords=np.array(points, dtype=np.float64),
            point_labels=np.array(labels),
            mask_input=prev_logits,
            multimask_output=multimask,
        )
        best = int(np.argmax(scores)) if multimask else 0
        pred = masks[best].astype(bool)
        prev_logits = logits[best : best + 1]
        ious.append(iou(pred, item.mask, item.ignore))
    return {"ious": ious, "clicks": points, "labels": labels}


def summarize_clicks(results: list[dict[str, Any]], max_clicks: int = 20) -> dict[str, float]:
    curves = np.array([r["ious"] for r in results]) if results else np.zeros((0, max_clicks))
    out = {
        "NoC@85": _mean([noc(r["ious"], 0.85, max_clicks) for r in results]),
        "NoC@90": _mean([noc(r["ious"], 0.90, max_clicks) for r in results]),
        "failures@90": int(sum(max(r["ious"]) < 0.90 for r in results)),
    }
    for k in (1, 3, 5):
        if k <= max_clicks:
            out[f"mIoU@{k}"] = float(curves[:, k - 1].mean()) if len(curves) else float("nan")
    out["mIoU_curve"] = curves.mean(axis=0).tolist() if len(curves) else []
    return out


def plot_click_curve(curve: Sequence[float], path: str, title: str) -> None:
    """Write the mIoU-vs-clicks curve as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    ax.plot(np.arange(1, len(curve) + 1), curve, marker="o", markersize=3)
    ax.set_xlabel("number of clicks")
    ax.set_ylabel("mIoU")
    ax.set_title(title, fontsize=9)
    ax.set_xticks(np.arange(1, len(curve) + 1, max(1, len(curve) // 10)))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- box ----------------------------------------------------------------------------------------------


def tight_box(mask: np.ndarray) -> np.ndarray:
    """(4,) XYXY pixel box of an (H, W) bool mask, inclusive of the last row and column (x1 = max x)."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)


def box(model: PromptModel, item: ObjectItem) -> dict[str, Any]:
    """The object's tight box (ignore pixels excluded) as prompt, single-mask output. Image already set."""
    valid = item.mask if item.ignore is None else item.mask & ~item.ignore
    b = tight_box(valid)
    masks, _, _ = _predict(model, box=b, multimask_output=False)
    return {"box": b.tolist(), "iou": iou(masks[0], item.mask, item.ignore)}


def summarize_box(results: list[dict[str, Any]]) -> dict[str, float]:
    return {"mIoU": _mean([r["iou"] for r in results])}


# --- grid prompts (edges, and proposals for models without a MaskGenerator) ---------------------------


def point_grid(points_per_side: int, height: int, width: int) -> np.ndarray:
    """(n*n, 2) (x, y) pixel centres of an n x n grid of cells over the image, row-major."""
    offset = 1.0 / (2 * points_per_side)
    side = np.linspace(offset, 1 - offset, points_per_side)
    xs, ys = np.meshgrid(side * width, side * height)
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def _boxes_of(masks: np.ndarray) -> np.ndarray:
    """(N, 4) XYXY boxes of (N, H, W) bool masks; an empty mask gets (0, 0, 0, 0)."""
    out = np.zeros((len(masks), 4), dtype=np.float32)
    for i, m in enumerate(masks):
        if m.any():
            out[i] = tight_box(m)
    return out


def _box_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    from samkit.masks import batched_nms

    b, s = torch.from_numpy(boxes).float(), torch.from_numpy(np.asarray(scores, dtype=np.float32))
    return batched_nms(b, s, torch.zeros(len(b), dtype=torch.int64), iou_threshold).numpy()


def grid_masks(
    model: PromptModel, height: int, width: int, points_per_side: int, nms_threshold: float = 0.7
) -> tuple[list[int], np.ndarray, list[np.ndarray], np.ndarray]:
    """Prompt every grid point (3-mask output), then drop redundant masks by box NMS.

    Returns the kept indices (into the flat point x 3 list, best score first), scores (N,), the masks
    (each (H, W) bool) and low-res logits (N, 256, 256) of all N predictions. Image already set.
    """
    all_masks, all_scores, all_logits = [], [], []
    for x, y in point_grid(points_per_side, height, width):
        masks, scores, logits = _predict(
            model, point_coords=np.array([[x, y]]), point_labels=np.array([1]), multimask_output=True
        )
        all_masks.extend(m.astype(bool) for m in masks)
        all_scores.extend(scores.tolist())
        all_logits.append(logits.astype(np.float16))
    scores = np.array(all_scores, dtype=np.float32)
    keep = [
        int(i) for i in _box_nms(_boxes_of(np.array(all_masks)), scores, nms_threshold) if all_masks[i].any()
    ]
    return keep, scores, all_masks, np.concatenate(all_logits)


# --- edges --------------------------------------------------------------------------------------------


def lowres_to_probability(logits: np.ndarray, height: int, width: int, image_size: int = 1024) -> np.ndarray:
    """(H, W) sigmoid probability from (256, 256) low-res logits in the padded model-input frame.

    Same geometry as the predictor's post-processing: upsample to `image_size`, crop the unpadded part
    (longest side scaled to `image_size`), resize to (H, W), all bilinear.
    """
    scale = image_size / max(height, width)
    h, w = int(height * scale + 0.5), int(width * scale + 0.5)
    t = torch.from_numpy(np.asarray(logits, dtype=np.float32))[None, None]
    t = interpolate_logits(t, image_size, (h, w), (height, width))
    return torch.sigmoid(t)[0, 0].numpy()


def sobel_magnitude(prob: np.ndarray) -> np.ndarray:
    """(H, W) Sobel gradient magnitude (3x3 kernels) of an (H, W) float map."""
    p = np.asarray(prob, dtype=np.float32)
    gx = cv2.Sobel(p, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)
    gy = cv2.Sobel(p, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)
    return np.hypot(gx, gy)


def edge_map(model: PromptModel, height: int, width: int, points_per_side: int = 16) -> np.ndarray:
    """The SAM paper's zero-shot edge map (appendix D.2), (H, W) float in [0, 1]. Image already set.

    16 x 16 grid of foreground points -> 768 masks -> box NMS (0.7) -> Sobel of each kept mask's
    unthresholded probability map -> per-pixel max over masks -> structured-edge NMS (Dollar's `edgesNms`,
    via pyEdgeEval, r=1 s=5 m=1.01) -> scaled so the image's maximum is 1 (the benchmark's thresholds
    span [0, 1]). A model without soft
    output (`provides_logits = False`, e.g. GrabCut) uses its binary masks as probabilities.
    """
    from pyEdgeEval.preprocess import fast_nms

    keep, _, masks, logits = grid_masks(model, height, width, points_per_side)
    soft = getattr(model, "provides_logits", True)
    edges = np.zeros((height, width), dtype=np.float32)
    for i in keep:
        prob = lowres_to_probability(logits[i], height, width) if soft else masks[i].astype(np.float32)
        np.maximum(edges, sobel_magnitude(prob), out=edges)
    if edges.max() <= 0:
        return edges.astype(np.float64)
    thin = np.clip(fast_nms(edges.astype(np.float64) / float(edges.max()), r=1, s=5, m=1.01), 0.0, None)
    return thin / thin.max() if thin.max() > 0 else thin


def edges(
    model: PromptModel,
    item: EdgeItem,
    height: int,
    width: int,
    points_per_side: int = 16,
    thresholds: int = 99,
) -> tuple:
    """Edge map of one BSDS image scored against its annotators at `thresholds` levels. Image already set.

    99 thresholds is the benchmark's setting; fewer are a faster approximation (each costs one
    correspondence per annotator). Returns (per-item result with the image's best F, BoundaryCounts).
    """
    levels = np.linspace(1.0 / (thresholds + 1), 1.0 - 1.0 / (thresholds + 1), thresholds)
    counts = boundary_counts(edge_map(model, height, width, points_per_side), item.boundaries, levels)
    return {"OIS_F": boundary_summary([counts])["OIS"]}, counts


def summarize_edges(counts: list[BoundaryCounts]) -> dict[str, float]:
    return boundary_summary(counts)


# --- proposals ----------------------------------------------------------------------------------------

MAX_PROPOSALS = (100, 1000)


def proposals(
    propose: Callable[[ImageItem], tuple[list[np.ndarray], np.ndarray]], item: ImageItem
) -> dict[str, Any]:
    """Score automatic masks of one image as object proposals.

    `propose(item)` returns the masks (each (H, W) bool) and their scores; proposals are ranked by score
    and cut to 100 and 1000. Returns, per GT object, its area and its best IoU under each budget.
    """
    masks, scores = propose(item)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    rles = [mask_utils.encode(np.asfortranarray(masks[i].astype(np.uint8))) for i in order]
    gts = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in item.masks]
    out: dict[str, Any] = {"areas": [int(m.sum()) for m in item.masks], "n_proposals": len(rles)}
    for budget in MAX_PROPOSALS:
        out[f"best_iou@{budget}"] = best_proposal_ious(gts, rles[:budget]).tolist()
    return out


def summarize_proposals(results: list[dict[str, Any]]) -> dict[str, float]:
    areas = np.array([a for r in results for a in r["areas"]])
    out: dict[str, float] = {}
    for budget in MAX_PROPOSALS:
        best = np.array([v for r in results for v in r[f"best_iou@{budget}"]])
        out[f"AR@{budget}"] = average_recall(best)
        for size in ("small", "medium", "large"):
            sel = np.array([size_bucket(a) == size for a in areas], dtype=bool)
            out[f"AR_{size}@{budget}"] = average_recall(best[sel]) if sel.any() else float("nan")
    out["n_objects"] = int(len(areas))
    return out
