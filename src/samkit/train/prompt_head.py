"""Training the learned-prompt head: the grid segment-everything run is the teacher.

Two steps, each a function and a `python -m samkit.train.prompt_head` subcommand:

* `teacher`: for each training image, the image embedding (1, 256, 64, 64) and, per point of the 32 x 32
  grid, what decoding it gives in the grid run: the best IoU between one of its masks that passes the
  filters and a mask the run keeps, and which kept mask that is; one `.npz` per image (rerun skips done
  images).
* `fit`: a `PromptHead` trained on those files to score each grid point's cell by that target (binary
  cross-entropy, optionally with a kept mask's target shared among the points that find it); saved as
  safetensors. A held-out report measures how much of the grid's kept masks each prompt choice recovers.

`samkit train configs/prompt_head.yaml` (a config with `task: prompt_head`) runs both (`train_from_config`)
and writes the head, a JSON log and a model card.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from samkit.everything.grids import layer_point_grids
from samkit.everything.learned import (
    PEAK_DEFAULTS,
    PeakSettings,
    box_extent_targets,
    grid_cells,
    pick_grid_indices,
)
from samkit.models.prompt_head import PromptHead


def _as_model(model: Any) -> Any:
    """A `Sam` model as given, or loaded (fp32) from a name or checkpoint path."""
    import samkit

    return samkit.load(model, dtype="fp32") if isinstance(model, (str, os.PathLike)) else model


def make_teacher(
    images: list[Path],
    out_dir: Path,
    model: Any = "vit_t",
    time_budget_s: float = 1e9,
    settings: dict[str, Any] | None = None,
) -> None:
    """One `<set>_<stem>.npz` per image in `out_dir`: features float16 (256, 64, 64); points float32 (N, 2)
    (x, y original pixels of the kept masks' prompts); grid_iou float32 (n * n,) and grid_match int32
    (n * n,) per point of the teacher's n x n grid (`point_targets`); grid_box float32 (n * n, 4)
    (`box_targets`); original_size, input_size, grid_seconds; model, model_config (the name and architecture
    id of the model that made it). `model`: a `Sam` model or a name to load. `settings`: MaskGenerator keyword
    arguments of the grid teacher (default: its defaults; one crop layer only). Files made before grid_iou
    was recorded are made again."""
    from samkit.everything.generator import MaskGenerator
    from samkit.everything.learned import head_metadata
    from samkit.everything.settings import DEFAULTS
    from samkit.image import load_image
    from samkit.predictor import Predictor

    out_dir.mkdir(parents=True, exist_ok=True)
    model = _as_model(model)
    made_by = head_metadata(model)
    settings = dict(settings or {})
    nms_thresh = float(settings.pop("box_nms_thresh", DEFAULTS.box_nms_thresh))
    # Every mask that passes the filters, with its prompt: the grid run's NMS is applied here afterwards.
    generator = MaskGenerator(model, output_mode="coco_rle", box_nms_thresh=1.0, **settings)
    pred = Predictor(model)
    start = time.perf_counter()
    for path in images:
        dest = teacher_file(out_dir, path)
        if dest.exists() and "grid_iou" in np.load(dest).files:
            continue
        if time.perf_counter() - start > time_budget_s:
            break
        arr = load_image(path)
        t0 = time.perf_counter()
        pred.set_image(arr)
        records = generator.generate(arr, embedded=pred)
        kept = kept_by_nms(records, nms_thresh)
        seconds = time.perf_counter() - t0
        grid = generator.point_grids[0] * np.array([[arr.shape[1], arr.shape[0]]])
        iou, match = point_targets(records, kept, grid)
        grid_box = box_targets(
            [records[k]["segmentation"] for k in kept], [records[k]["bbox"] for k in kept], grid
        )
        points = np.array([records[k]["point_coords"][0] for k in kept], dtype=np.float32).reshape(-1, 2)
        tmp = dest.with_suffix(".tmp.npz")
        np.savez_compressed(
            tmp,
            features=pred.embedding[0].cpu().numpy().astype(np.float16),
            points=points,
            grid_iou=iou,
            grid_match=match,
            grid_box=grid_box,
            original_size=np.array(pred.original_size),
            input_size=np.array(pred.input_size),
            grid_seconds=np.array(seconds),
            targets=np.array("decoded"),
            model=np.array(made_by["model"]),
            model_config=np.array(made_by["model_config"]),
        )
        os.replace(tmp, dest)
        print(
            f"{dest.name}: {len(points)} masks, {int((iou >= 0.5).sum())} of {len(iou)} points useful, "
            f"{seconds:.1f} s",
            flush=True,
        )


def containment_targets(kept_masks: list[dict[str, Any]], grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`point_targets` without decoding every grid point: a point inside a kept mask (coco_rle) is taken to
    find it (IoU 1.0), the smallest one when several hold it; -1 / 0.0 elsewhere. For (P, 2) `grid` points
    (x, y original pixels)."""
    from pycocotools import mask as mask_utils

    iou = np.zeros(len(grid), dtype=np.float32)
    match = np.full(len(grid), -1, dtype=np.int32)
    if not kept_masks:
        return iou, match
    masks = mask_utils.decode(kept_masks)  # (H, W, K)
    h, w = masks.shape[:2]
    cols = np.clip(np.floor(grid[:, 0]).astype(np.int64), 0, w - 1)
    rows = np.clip(np.floor(grid[:, 1]).astype(np.int64), 0, h - 1)
    inside = masks[rows, cols].astype(bool)  # (P, K)
    area = masks.reshape(-1, masks.shape[2]).sum(0)
    smallest = np.where(inside, area[None, :], np.iinfo(np.int64).max).argmin(1)
    found = inside.any(1)
    iou[found] = 1.0
    match[found] = smallest[found]
    return iou, match


def box_targets(kept_masks: list[dict[str, Any]], kept_bboxes: list, grid: np.ndarray) -> np.ndarray:
    """(P, 4) float32 XYXY original-pixel box targets of the head's box branch: for each of the (P, 2) `grid`
    points, the box of the smallest kept mask (coco_rle; `kept_bboxes` their XYWH boxes) that holds it, the
    object the point lies in; NaN for a point in none."""
    _, which = containment_targets(kept_masks, grid)
    out = np.full((len(grid), 4), np.nan, dtype=np.float32)
    if len(kept_bboxes):
        xyxy = np.asarray(kept_bboxes, dtype=np.float32).reshape(-1, 4).copy()
        xyxy[:, 2:] += xyxy[:, :2]
        inside = which >= 0
        out[inside] = xyxy[which[inside]]
    return out


def _recover_kept(
    d: dict[str, np.ndarray], model: Any, pred: Any, settings: dict[str, Any], nms_thresh: float
) -> list[dict[str, Any]]:
    """The grid run's kept masks (records, best first) of a teacher file `d`, without a new grid run: its
    stored kept points are decoded again from its stored embedding, and the grid run's filters and NMS
    keep them again (the embedding is stored in float16: very nearly the same masks)."""
    from samkit.everything.generator import MaskGenerator

    h, w = (int(v) for v in d["original_size"])
    pred.set_embedding(d["features"].astype(np.float32)[None], (h, w))
    points = d["points"].astype(np.float64).reshape(-1, 2)
    generator = MaskGenerator(
        model,
        points_per_side=None,
        point_grids=[points / [w, h]],
        box_nms_thresh=1.0,
        output_mode="coco_rle",
        **settings,
    )
    image = np.zeros((h, w, 3), dtype=np.uint8)  # only its size is read: the embedding is given
    records = generator.generate(image, embedded=pred)
    return [records[k] for k in kept_by_nms(records, nms_thresh)]


def _kept_recovery(
    model: Any, settings: dict[str, Any] | None
) -> Callable[[dict[str, np.ndarray]], tuple[list[dict[str, Any]], np.ndarray]]:
    """A function from a teacher file's arrays to its kept masks (records, recovered by `_recover_kept`)
    and the teacher grid's points ((P, 2) x, y original pixels). `settings`: the grid teacher's
    MaskGenerator settings, as for `make_teacher`."""
    from samkit.everything.settings import DEFAULTS
    from samkit.predictor import Predictor

    settings = dict(settings or {})
    nms_thresh = float(settings.pop("box_nms_thresh", DEFAULTS.box_nms_thresh))
    n = int(settings.pop("points_per_side", DEFAULTS.points_per_side))
    model = _as_model(model)
    pred = Predictor(model)

    def recover(d: dict[str, np.ndarray]) -> tuple[list[dict[str, Any]], np.ndarray]:
        h, w = (int(v) for v in d["original_size"])
        grid = layer_point_grids(n, 0, 1)[0] * np.array([[w, h]])
        return _recover_kept(d, model, pred, settings, nms_thresh), grid

    return recover


def _lacking(files: list[Path], key: str) -> list[Path]:
    """The teacher files of `files` without the array `key` (not a file a stopped run left)."""
    return [f for f in files if not f.name.endswith(".tmp.npz") and key not in np.load(f).files]


def add_box_targets(files: list[Path], model: Any = "vit_t", settings: dict[str, Any] | None = None) -> None:
    """`grid_box` (`box_targets`) for teacher files made without it, from their kept masks recovered by
    `_recover_kept` (no new grid run); the files keep their order (modification times)."""
    todo = _lacking(files, "grid_box")
    if not todo:
        return
    recover = _kept_recovery(model, settings)
    for f in todo:
        d = dict(np.load(f))
        if "grid_iou" not in d:
            continue  # relabel_from_kept first
        kept, grid = recover(d)
        grid_box = box_targets([r["segmentation"] for r in kept], [r["bbox"] for r in kept], grid)
        _rewrite(f, {**d, "grid_box": grid_box})
        print(f"{f.name}: box targets from {len(kept)} kept masks", flush=True)


def _rewrite(f: Path, arrays: dict[str, np.ndarray]) -> None:
    """Replace teacher file `f` atomically with `arrays`, keeping its modification time (`fit` holds out
    the last made)."""
    tmp = f.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    made = f.stat()
    os.replace(tmp, f)
    os.utime(f, ns=(made.st_atime_ns, made.st_mtime_ns))


def relabel_from_kept(
    files: list[Path], model: Any = "vit_t", settings: dict[str, Any] | None = None
) -> None:
    """Per-point targets for teacher files that hold only the kept masks' prompt points (made before the
    per-point targets were recorded), without a new grid run: each kept point is decoded again from the
    stored embedding, the grid run's filters and NMS recover the kept masks, and `containment_targets`
    scores the grid points (`targets` "containment" in the file; "decoded" for a full grid run), and
    `box_targets` gives their boxes. `settings`: the grid teacher's MaskGenerator settings, as for
    `make_teacher`."""
    todo = _lacking(files, "grid_iou")
    if not todo:
        return
    recover = _kept_recovery(model, settings)
    for f in todo:
        d = dict(np.load(f))
        records, grid = recover(d)
        kept = [r["segmentation"] for r in records]
        iou, match = containment_targets(kept, grid)
        grid_box = box_targets(kept, [r["bbox"] for r in records], grid)
        targets = {
            "grid_iou": iou,
            "grid_match": match,
            "grid_box": grid_box,
            "targets": np.array("containment"),
        }
        _rewrite(f, {**d, **targets})
        print(f"{f.name}: {len(kept)} kept masks, {int((iou > 0).sum())} grid points inside one", flush=True)


def teacher_files(teacher_dir: Path) -> list[Path]:
    """The finished teacher files of `teacher_dir` (with per-point targets; not a file being written)."""
    files = [f for f in teacher_dir.glob("*.npz") if not f.name.endswith(".tmp.npz")]
    return [f for f in sorted(files) if "grid_iou" in np.load(f).files]


def kept_by_nms(records: list[dict[str, Any]], nms_thresh: float) -> np.ndarray:
    """Indices into `records` (every mask that passed the filters, one crop) of the masks the grid run
    keeps: box NMS at `nms_thresh` by predicted IoU, as MaskGenerator does; best first."""
    from samkit.masks import batched_nms

    if not records:
        return np.zeros(0, dtype=np.int64)
    boxes = torch.tensor([r["bbox"] for r in records], dtype=torch.int64)  # XYWH
    boxes[:, 2:] += boxes[:, :2]
    scores = torch.tensor([r["predicted_iou"] for r in records], dtype=torch.float32)
    return batched_nms(boxes.float(), scores, torch.zeros(len(records)), nms_thresh).numpy()


def point_targets(
    records: list[dict[str, Any]], kept: np.ndarray, grid: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """What decoding each grid point gives: per point of `grid` ((P, 2) x, y original pixels, the prompts
    the records came from), the best mask IoU between one of its masks that passed the filters
    (`records`, coco_rle, `point_coords` one of the grid's points) and a kept mask (`records[kept]`), and
    which kept mask (index into `kept`) that is. (P,) float32 IoU (0 where no mask of the point passed)
    and (P,) int32 (-1 there)."""
    from pycocotools import mask as mask_utils

    iou = np.zeros(len(grid), dtype=np.float32)
    match = np.full(len(grid), -1, dtype=np.int32)
    if not records or not len(kept):
        return iou, match
    pts = np.array([r["point_coords"][0] for r in records], dtype=np.float64)
    owner = np.abs(pts[:, None, :] - grid[None]).sum(-1).argmin(1)  # the grid point each mask came from
    rles = [r["segmentation"] for r in records]
    overlap = np.asarray(mask_utils.iou(rles, [rles[k] for k in kept], [0] * len(kept))).reshape(
        len(rles), -1
    )
    best, which = overlap.max(1), overlap.argmax(1)
    for r in np.argsort(best, kind="stable"):  # the best mask of each point is written last
        iou[owner[r]] = best[r]
        match[owner[r]] = which[r]
    return iou, match


def teacher_recall(iou: np.ndarray, match: np.ndarray, n_kept: int, picked: np.ndarray) -> float:
    """How much of the grid run's kept masks the `picked` grid points (indices) recover, if each picked
    point's best mask is found: per kept mask the best IoU among the picked points matched to it, as
    recall averaged over IoU 0.5:0.95 (the proposal protocol's thresholds); near 1.0 for all n * n points."""
    if n_kept == 0:
        return 1.0
    best = np.zeros(n_kept)
    m = match[picked]
    ok = m >= 0
    np.maximum.at(best, m[ok], iou[picked][ok])
    return float(np.mean([(best >= t - 1e-6).mean() for t in np.linspace(0.5, 0.95, 10)]))


def grid_target(
    iou: np.ndarray, match: np.ndarray, share: float | None = None, power: float = 1.0
) -> np.ndarray:
    """(P,) float32 training target per grid point from the teacher's `grid_iou` / `grid_match`: the IoU
    itself, or with `share`, divided among the points that find the same kept mask (IoU >= 0.5): a mask
    found by m points gives each iou * min(1, share / m ** power), so a small object's few points rank
    above a large object's many (one or two of those suffice); `power` < 1 divides less, which keeps large
    objects' points within reach of a fixed prompt budget."""
    target = iou.astype(np.float32)
    if share is None:
        return target
    useful = (iou >= 0.5) & (match >= 0)
    counts = np.bincount(match[useful], minlength=int(match.max(initial=-1)) + 1)
    m = np.where(match >= 0, counts[np.maximum(match, 0)], 1).clip(min=1)
    return (target * np.minimum(1.0, share / m.astype(np.float64) ** power)).astype(np.float32)


def grid_point_loss(logits: torch.Tensor, cells: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy between the heat map at each grid point's cell and what decoding that point
    gives: `logits` (B, 1, side, side), `cells` (B, P) flat cell indices (`grid_cells`), `target` (B, P)
    the teacher's grid_iou (a soft label: 1 where a point's mask is a kept mask, 0 where nothing passes)."""
    picked = logits.flatten(1).gather(1, cells)
    return F.binary_cross_entropy_with_logits(picked, target)


def _load_teacher(
    files: list[Path], key: str, target: Callable[[Any, tuple[int, int], tuple[int, int], int], np.ndarray]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features (N, 256, side, side) float16, the teacher grid points' cells (N, P) int64 and the targets
    `target(arrays, original_size, input_size, n)` gives each file (n x n points: P entries of its array
    `key`; a file without `key` is a ValueError)."""
    feats, cells, targets = [], [], []
    for f in files:
        d = np.load(f)
        if key not in d.files:
            raise ValueError(f"{f.name} has no {key} (relabel_from_kept, add_box_targets)")
        feats.append(torch.from_numpy(d["features"]))
        side = feats[-1].shape[-1]  # 64 for a 1024 px encoder
        n = int(round(len(d[key]) ** 0.5))
        osz = tuple(int(v) for v in d["original_size"])
        isz = tuple(int(v) for v in d["input_size"])
        cells.append(torch.from_numpy(grid_cells(osz, isz, n, side)[2]))
        targets.append(torch.from_numpy(target(d, osz, isz, n)))
    return torch.stack(feats), torch.stack(cells), torch.stack(targets)


def _load(
    files: list[Path], share: float | None, power: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_load_teacher` with the heat map's targets: (N, P) float32 `grid_target`."""
    return _load_teacher(
        files, "grid_iou", lambda d, *_: grid_target(d["grid_iou"], d["grid_match"], share, power)
    )


def _load_boxes(files: list[Path]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_load_teacher` with the box branch's targets: (N, P, 4) float32 `box_extent_targets` of `grid_box`
    (NaN: a point in no kept mask)."""

    def extents(d: Any, osz: tuple[int, int], isz: tuple[int, int], n: int) -> np.ndarray:
        points = layer_point_grids(n, 0, 1)[0] * np.array([[osz[1], osz[0]]])
        return box_extent_targets(d["grid_box"], points, osz, isz)

    return _load_teacher(files, "grid_box", extents)


def _at_cells(extents: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """(B, 4, side, side) and (B, P) flat cell indices -> (B, P, 4)."""
    return extents.flatten(2).gather(2, cells[:, None, :].expand(-1, 4, -1)).transpose(1, 2)


def box_loss(extents: torch.Tensor, cells: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Smooth L1 between the box branch's log extents at the grid points' cells and the targets, over the
    points that lie in a kept mask (finite targets)."""
    picked, ok = _at_cells(extents, cells), torch.isfinite(target[..., 0])
    if not ok.any():
        return extents.sum() * 0.0
    return F.smooth_l1_loss(picked[ok], target[ok], beta=0.5)


def extent_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of the boxes that (K, 4) log extents `a` and `b` put around the same point."""
    a, b = a.exp(), b.exp()
    iw = torch.minimum(a[:, 0], b[:, 0]) + torch.minimum(a[:, 2], b[:, 2])
    ih = torch.minimum(a[:, 1], b[:, 1]) + torch.minimum(a[:, 3], b[:, 3])
    inter = iw * ih
    area_a = (a[:, 0] + a[:, 2]) * (a[:, 1] + a[:, 3])
    area_b = (b[:, 0] + b[:, 2]) * (b[:, 1] + b[:, 3])
    return inter / (area_a + area_b - inter)


def _train_steps(
    params: list[torch.nn.Parameter],
    loss_at: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    steps: int,
    lr: float,
    batch: int,
    name: str,
) -> list[dict[str, float]]:
    """`steps` AdamW steps (weight decay 1e-4, cosine schedule from `lr`) on `params`, each on the loss
    `loss_at` gives a batch of `batch` random file indices below `n`; the log (every 100th and the last
    step's loss, as `name`, and the seconds so far), printed as it goes."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    log, t0 = [], time.perf_counter()
    for step in range(steps):
        loss = loss_at(torch.randint(n, (batch,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log.append({"step": step, name: loss.item(), "seconds": time.perf_counter() - t0})
            print(log[-1], flush=True)
    return log


def fit_boxes(
    head: PromptHead,
    files: list[Path],
    held: list[Path],
    steps: int = 1200,
    lr: float = 2e-3,
    batch: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Train a new box branch for `head` (replacing one it has; the heat map is left as it is) on the
    teacher files' box targets (`box_loss`); returns the loss log and a held-out report (box IoU at the
    held-out files' grid points that lie in a kept mask)."""
    torch.manual_seed(seed)
    fresh = PromptHead(boxes=True)  # a new branch, also for a head that has one
    head.box_body, head.box_out = fresh.box_body, fresh.box_out
    assert head.box_body is not None and head.box_out is not None
    head.train()
    x_all, c_all, t_all = _load_boxes(files)
    params = [*head.box_body.parameters(), *head.box_out.parameters()]

    def loss_at(idx: torch.Tensor) -> torch.Tensor:
        return box_loss(head.extents(x_all[idx].float()), c_all[idx], t_all[idx])

    t0 = time.perf_counter()
    log = _train_steps(params, loss_at, len(files), steps, lr, batch, "box_loss")
    head.eval()
    report: dict[str, float] = {}
    if held:
        xh, ch, th = _load_boxes(held)
        with torch.no_grad():
            picked = _at_cells(head.extents(xh.float()), ch)
        ok = torch.isfinite(th[..., 0])
        iou = extent_box_iou(picked[ok], th[ok])
        report = {
            "points": int(ok.sum()),
            "box_iou_mean": float(iou.mean()),
            "box_iou_median": float(iou.median()),
            "box_iou_0.7": float((iou >= 0.7).float().mean()),
        }
        print(report, flush=True)
    return {
        "box_steps": steps,
        "box_log": log,
        "box_heldout": report,
        "box_seconds": time.perf_counter() - t0,
    }


# The prompt choices the held-out report compares: the shipped default's points up to where its yield rule
# starts (that rule needs the decoded masks), fixed budgets, a higher threshold.
HELDOUT_CHOICES = (
    dataclasses.replace(PEAK_DEFAULTS, max_points=PEAK_DEFAULTS.yield_after),
    *(PeakSettings(threshold=0.0, min_points=k, max_points=k) for k in (100, 128, 200, 256)),
    PeakSettings(threshold=0.2, min_points=64, max_points=150),
)


@torch.no_grad()
def heldout_report(
    head: PromptHead, files: list[Path], choices: tuple[PeakSettings, ...] = HELDOUT_CHOICES
) -> list:
    """Per prompt choice: mean prompts per image and `teacher_recall` (how much of the grid run's kept
    masks the picked points recover) over held-out teacher files (training images the head did not see)."""
    rows = []
    data = []
    for f in files:
        d = np.load(f)
        osz = tuple(int(v) for v in d["original_size"])
        isz = tuple(int(v) for v in d["input_size"])
        logits = head(torch.from_numpy(d["features"].astype(np.float32))[None])[0, 0]
        data.append((logits, osz, isz, d["grid_iou"], d["grid_match"], len(d["points"])))
    for settings in choices:
        n_points, recall = [], []
        for logits, osz, isz, iou, match, n_kept in data:
            grid = int(round(len(iou) ** 0.5))  # the teacher's grid
            picked = pick_grid_indices(logits, osz, isz, dataclasses.replace(settings, grid=grid))
            n_points.append(len(picked))
            recall.append(teacher_recall(iou, match, n_kept, picked))
        rows.append(
            {
                **dataclasses.asdict(settings),
                "prompts_per_image": float(np.mean(n_points)),
                "teacher_recall": float(np.mean(recall)),
            }
        )
    return rows


def teacher_model(files: list[Path]) -> dict[str, str] | None:
    """`head_metadata` of the model that made the teacher `files` (as they record it; files that record
    none are skipped), None if none records one; ValueError if they name more than one architecture."""
    from samkit.everything.learned import HEAD_FORMAT

    found: dict[str, str] = {}
    for f in files:
        with np.load(f) as d:
            if "model_config" in d.files:
                found.setdefault(str(d["model_config"]), str(d["model"]))
    if len(found) > 1:
        names = ", ".join(sorted(set(found.values())))
        raise ValueError(f"teacher files of more than one model ({names}) in {files[0].parent}")
    if not found:
        return None
    ((config, name),) = found.items()
    return {"format": HEAD_FORMAT, "model": name, "model_config": config}


def fit(
    teacher_dir: Path,
    out: Path,
    steps: int = 400,
    lr: float = 2e-3,
    batch: int = 8,
    seed: int = 0,
    holdout: int = 6,
    share: float | None = None,
    power: float = 1.0,
    only: list[Path] | None = None,
    box_steps: int = 0,
    trained_for: dict[str, str] | None = None,
) -> dict:
    """Train a PromptHead on the teacher files (those named in `only`, if given) but the last `holdout` made
    (reported on, not trained on), targets `grid_target(..., share, power)`, and with `box_steps` its box
    branch (`fit_boxes`); writes `out` (safetensors, recording `trained_for`, by default `teacher_model`:
    the model that made the teacher files) and `<out>.json` (settings, loss log, held-out report, the files
    used)."""
    from samkit.everything.learned import save_head

    torch.manual_seed(seed)
    all_files = sorted(teacher_files(teacher_dir), key=lambda f: f.stat().st_mtime)
    if only is not None:  # e.g. the config's images: other files in a shared teacher folder are left out
        names = {f.name for f in only}
        all_files = [f for f in all_files if f.name in names]
    if len(all_files) <= holdout:
        raise FileNotFoundError(f"need more than {holdout} teacher files in {teacher_dir}")
    files, held = all_files[: len(all_files) - holdout], all_files[len(all_files) - holdout :]
    trained_for = trained_for or teacher_model(all_files)
    x_all, c_all, t_all = _load(files, share, power)
    head = PromptHead()

    def loss_at(idx: torch.Tensor) -> torch.Tensor:
        return grid_point_loss(head(x_all[idx].float()), c_all[idx], t_all[idx])

    t0 = time.perf_counter()
    log = _train_steps(list(head.parameters()), loss_at, len(files), steps, lr, batch, "loss")
    boxes = fit_boxes(head, files, held, box_steps, lr, batch, seed) if box_steps else {}
    save_head(head, out, trained_for)
    head.eval()
    report = heldout_report(head, held) if held else []
    for row in report:
        print(row, flush=True)
    info = {
        "images": len(files),
        "heldout_images": [f.stem for f in held],
        "files": [f.name for f in files],
        "heldout": report,
        "steps": steps,
        "lr": lr,
        "batch": batch,
        "seed": seed,
        "share": share,
        "power": power,
        "seconds": time.perf_counter() - t0,
        "log": log,
        **boxes,
    }
    out.with_suffix(".json").write_text(json.dumps(info, indent=1))
    return info


# Where a teacher image comes from -> the licence of its data, for the model card (see the datasets' README).
_LICENCES = {
    "coco_mini": "COCO 2017: annotations CC BY 4.0, images per their Flickr licence",
    "ccp": "Clothing Co-Parsing: Apache-2.0",
    "camvid": "CamVid: research use, non-commercial",
    "dsb2018": "DSB 2018 (BBBC038): CC0",
    "bsds500": "BSDS500: research use",
}


def _set_name(image: Path) -> str:
    """The dataset an image belongs to: `<set>/<split>/images/x.jpg` (instances) and
    `bsds500/images/<split>/x.jpg` both name their set three folders up."""
    return image.parent.parent.parent.name


def _check_training_folder(folder: Path) -> None:
    """A ConfigError for an evaluation split (never a teacher: the head is measured on those)."""
    from samkit.train.config import ConfigError

    parts = folder.resolve().parts
    if (
        "interactive" in parts
        or ("instances" in parts and "val" in parts)
        or ("bsds500" in parts and "test" in parts)
    ):
        raise ConfigError(f"{folder} is an evaluation split; the prompt head trains on training splits only")
    if not folder.is_dir():
        raise ConfigError(f"teacher image folder not found: {folder}")


def _folder_images(entry: str | Path | dict[str, Any], per_folder: int | None) -> list[Path]:
    """One `teacher.folders` entry: a folder (its first `per_folder` images in name order) or
    `{folder: F, images: LIST}` (the images of F named in the text file LIST, one name per line, in that
    order; `#` starts a comment). BSDS500 images in its `eval-overlap.txt` are skipped either way."""
    from samkit.train.config import ConfigError

    listed = None
    if isinstance(entry, dict):
        unknown = set(entry) - {"folder", "images"}
        if unknown or "folder" not in entry or "images" not in entry:
            raise ConfigError(f"teacher.folders entry {entry}: a folder, or {{folder: F, images: LIST}}")
        names_file = Path(entry["images"])
        if not names_file.is_file():
            raise ConfigError(f"teacher.folders: image list not found: {names_file}")
        listed = [line.split("#")[0].strip() for line in names_file.read_text().splitlines()]
        listed = [n for n in listed if n]
        entry = entry["folder"]
    f = Path(entry)
    _check_training_folder(f)
    if listed is None:
        files = sorted(p for p in f.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    else:
        files = [f / n for n in listed]
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise ConfigError(f"teacher.folders: {missing[0]} (in {names_file}) is not an image of {f}")
    overlap = f.parent.parent / "eval-overlap.txt"
    if f.parent.parent.name == "bsds500" and overlap.is_file():
        skip = set(overlap.read_text().split())
        files = [p for p in files if p.stem not in skip]
    return files[:per_folder] if per_folder is not None and listed is None else files


def training_images(folders: list[str | Path | dict[str, Any]], per_folder: int | None = None) -> list[Path]:
    """The images of `folders` (training splits; evaluation splits are refused): of a folder its first
    `per_folder` in name order, of a `{folder, images}` entry the listed ones (`_folder_images`);
    interleaved so that a time budget covers every entry, each image once."""
    per = [_folder_images(entry, per_folder) for entry in folders]
    n = max((len(p) for p in per), default=0)
    out, seen = [], set()
    for path in (p[i] for i in range(n) for p in per if i < len(p)):
        if path.resolve() not in seen:  # a listed image may also be among a folder's first ones
            seen.add(path.resolve())
            out.append(path)
    return out


def teacher_file(teacher_dir: Path, image: Path) -> Path:
    """Where the teacher stores what it learned from `image`: `<set>_<stem>.npz`."""
    return teacher_dir / f"{_set_name(image)}_{image.stem}.npz"


def _model_card(cfg: dict[str, Any], info: dict[str, Any], teacher_dir: Path, head_file: Path) -> str:
    sets: dict[str, int] = {}
    masks, seconds = 0, []
    for f in [teacher_dir / n for n in info["files"]] + [
        teacher_dir / f"{n}.npz" for n in info["heldout_images"]
    ]:
        d = np.load(f)
        name = next((s for s in _LICENCES if f.stem.startswith(s + "_")), f.stem.rsplit("_", 1)[0])
        sets[name] = sets.get(name, 0) + 1
        masks += len(d["points"])
        seconds.append(float(d["grid_seconds"]))
    rows = [
        ("head file", f"{head_file.name}, {head_file.stat().st_size / 2**20:.2f} MB"),
        (
            "encoder",
            f"the image embedding of `{cfg['model']}` (recorded in the head file; refused for another "
            "architecture)",
        ),
        ("teacher", f"grid segment everything, settings {cfg['teacher'].get('settings') or 'default'}"),
        (
            "data",
            f"{info['images']} training-split images trained on and {len(info['heldout_images'])} held out "
            f"(the last made), of {', '.join(f'{n} {s}' for s, n in sets.items())}; {masks} kept teacher masks",
        ),
        ("data licences", "; ".join(_LICENCES.get(s, f"{s}: see the dataset's terms") for s in sets)),
        ("teacher time", f"{np.mean(seconds):.1f} s per image (grid run, this machine)" if seconds else "-"),
        (
            "training",
            f"{info['steps']} steps, batch {info['batch']}, AdamW lr {info['lr']} (cosine), seed {info['seed']}, "
            f"{info['seconds']:.0f} s",
        ),
    ]
    rows.append(
        (
            "target",
            f"per grid point, `grid_target` with share {info['share']}, power {info.get('power', 1.0)}",
        )
    )
    if info.get("box_steps"):
        b, nan = info["box_heldout"], float("nan")
        rows.append(
            (
                "box branch",
                f"{info['box_steps']} steps; held out: box IoU mean {b.get('box_iou_mean', nan):.2f}, "
                f"median {b.get('box_iou_median', nan):.2f} against the smallest kept mask holding "
                f"each grid point ({b.get('points', 0)} points)",
            )
        )
    for row in info["heldout"]:
        rows.append(
            (
                f"held out: threshold {row['threshold']}, {row['min_points']}-{row['max_points']} points, "
                f"nms_radius {row['nms_radius']}",
                f"{row['prompts_per_image']:.0f} prompts per image recover "
                f"{100 * row['teacher_recall']:.1f}% of the grid run's kept masks (recall over IoU 0.5:0.95)",
            )
        )
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (
        f"# Model card: {head_file.name}\n\n"
        'A `PromptHead` for `MaskGenerator(prompts="learned")`, trained by `samkit train` from a '
        "`task: prompt_head` config. The held-out figures are on training-split images the head did not see; "
        "no evaluation split was used for training or for choosing settings.\n\n"
        f"| | |\n|---|---|\n{table}\n"
    )


def load_prompt_head_config(
    config: str | Path, overrides: list[str] | tuple[str, ...] = (), out: str | Path | None = None
) -> dict[str, Any]:
    """The settings of a `task: prompt_head` YAML config (defaults <- file <- `a.b=value` overrides <- `out`),
    checked: unknown keys and a config without teacher folders are one-line ConfigErrors."""
    from samkit.train.config import ConfigError, parse_override, read_yaml, task_of

    cfg: dict[str, Any] = {
        "model": "vit_t",
        "out": "runs/prompt_head",
        "threads": None,
        "teacher": {"folders": [], "per_folder": None, "budget_s": None, "dir": None, "settings": {}},
        "fit": {
            "steps": 400,
            "lr": 2e-3,
            "batch": 8,
            "seed": 0,
            "holdout": 6,
            "share": None,
            "power": 1.0,
            "box_steps": 0,
        },
    }
    user = read_yaml(config)
    if task_of(user) != "prompt_head":
        raise ConfigError(f"{config} is not a `task: prompt_head` config")
    user.pop("task")
    for key, value in user.items():
        if key not in cfg:
            raise ConfigError(f"unknown config key {key!r}; known keys: task, {', '.join(cfg)}")
        if isinstance(cfg[key], dict):
            unknown = set(value or {}) - set(cfg[key])
            if unknown:
                raise ConfigError(
                    f"unknown config key {key}.{sorted(unknown)[0]}; known: {', '.join(cfg[key])}"
                )
            cfg[key].update(value or {})
        else:
            cfg[key] = value
    for text in overrides:
        keys, value = parse_override(text)
        node = cfg
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                raise ConfigError(f"--set {text}: {k!r} is not a config section")
            node = node[k]
        if keys[-1] not in node:
            raise ConfigError(f"--set {text}: unknown key {keys[-1]!r}; known: {', '.join(node)}")
        node[keys[-1]] = value
    if out is not None:
        cfg["out"] = str(out)
    if not cfg["teacher"]["folders"]:
        raise ConfigError("teacher.folders: list the training-split image folders to learn from")
    return cfg


def train_from_config(
    config: str | Path, overrides: list[str] | tuple[str, ...] = (), out: str | Path | None = None
) -> dict[str, Any]:
    """Teacher (resumable: images already done are skipped) then fit, from a `task: prompt_head` YAML
    config (configs/prompt_head.yaml shows every key); `overrides` are `a.b=value` strings.

    Writes OUT/prompt_head.safetensors, OUT/prompt_head.json (the fit log) and OUT/MODEL_CARD.md;
    returns the fit's info dict with `head` and `card` (paths) added."""
    import samkit
    from samkit.everything.learned import head_metadata
    from samkit.train.config import ConfigError

    cfg = load_prompt_head_config(config, overrides, out)
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    out_dir = Path(cfg["out"])
    teacher_dir = Path(cfg["teacher"]["dir"] or out_dir / "teacher")
    t = cfg["teacher"]
    model = samkit.load(cfg["model"], dtype="fp32")  # loaded once, for every step below
    trained_for = head_metadata(model)
    try:  # a head learns one model's embeddings
        made = teacher_model(sorted(teacher_dir.glob("*.npz")))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if made is not None and made["model_config"] != trained_for["model_config"]:
        raise ConfigError(
            f"teacher.dir {teacher_dir} holds teacher files of {made['model']}, not of "
            f"{trained_for['model']}: give this model a teacher.dir of its own"
        )
    images = training_images(t["folders"], t["per_folder"])
    relabel_from_kept(sorted(teacher_dir.glob("*.npz")), model, t["settings"])  # older teacher files
    make_teacher(images, teacher_dir, model, t["budget_s"] or 1e9, t["settings"])
    f = cfg["fit"]
    if f["box_steps"]:  # teacher files made before the box targets were recorded
        add_box_targets(sorted(teacher_dir.glob("*.npz")), model, t["settings"])
    head_file = out_dir / "prompt_head.safetensors"
    try:
        info = fit(
            teacher_dir,
            head_file,
            f["steps"],
            f["lr"],
            f["batch"],
            f["seed"],
            f["holdout"],
            f["share"],
            float(f["power"]),
            only=[teacher_file(teacher_dir, p) for p in images],
            box_steps=int(f["box_steps"]),
            trained_for=trained_for,
        )
    except FileNotFoundError as exc:
        raise ConfigError(f"{exc} (more teacher.folders images, or a larger teacher.budget_s)") from None
    card = out_dir / "MODEL_CARD.md"
    card.write_text(_model_card(cfg, info, teacher_dir, head_file))
    return {**info, "head": str(head_file), "card": str(card)}


def add_box_branch(
    teacher_dir: Path, head_file: Path | None, out: Path, steps: int, holdout: int = 6
) -> dict:
    """A head file's heat map with a box branch trained by `fit_boxes` on `teacher_dir` (all its files but
    the last `holdout` made, as `fit` splits them; box targets added where missing); writes `out` and
    `<out>.json` (the box log and held-out report)."""
    from samkit.everything.learned import load_head, save_head

    add_box_targets(sorted(teacher_dir.glob("*.npz")))
    files = sorted(teacher_files(teacher_dir), key=lambda f: f.stat().st_mtime)
    train, held = files[: len(files) - holdout], files[len(files) - holdout :]
    head = load_head(head_file)
    info = fit_boxes(head, train, held, steps)
    save_head(head, out, head.trained_for)
    info = {**info, "images": len(train), "heldout_images": [f.stem for f in held]}
    out.with_suffix(".json").write_text(json.dumps(info, indent=1))
    return info


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m samkit.train.prompt_head")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser(
        "teacher", help="embeddings + what each grid point gives in the grid run, per training image"
    )
    p.add_argument("folders", nargs="+", help="image folders of training splits")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--per-folder", type=int, default=None, help="first N images of each folder")
    p.add_argument("--budget-s", type=float, default=1e9, help="stop starting new images after this")
    p = sub.add_parser("fit", help="train the head on the teacher files")
    p.add_argument("teacher", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--holdout", type=int, default=6, help="last N teacher files: reported on, not trained on")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--share", type=float, default=None, help="split a mask's target among its points")
    p.add_argument("--power", type=float, default=1.0, help="split by share / m ** power (m: its points)")
    p.add_argument("--box-steps", type=int, default=0, help="also train the box branch for N steps")
    p = sub.add_parser("relabel", help="per-point targets for teacher files that hold only kept points")
    p.add_argument("teacher", type=Path)
    p = sub.add_parser("boxes", help="train a head file's box branch (its heat map is kept as it is)")
    p.add_argument("teacher", type=Path)
    p.add_argument("--head", type=Path, default=None, help="head file (default: the shipped one)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--holdout", type=int, default=6, help="last N teacher files: reported on, not trained on")
    args = parser.parse_args()
    if args.cmd == "teacher":
        make_teacher(training_images(args.folders, args.per_folder), args.out, time_budget_s=args.budget_s)
    elif args.cmd == "relabel":
        relabel_from_kept(sorted(args.teacher.glob("*.npz")))
    elif args.cmd == "boxes":
        add_box_branch(args.teacher, args.head, args.out, args.steps, args.holdout)
    else:
        fit(
            args.teacher,
            args.out,
            steps=args.steps,
            lr=args.lr,
            batch=args.batch,
            holdout=args.holdout,
            share=args.share,
            power=args.power,
            box_steps=args.box_steps,
        )


if __name__ == "__main__":
    main()
