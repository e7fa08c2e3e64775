"""Learned prompts for segment-everything: peaks of a `PromptHead` heat map instead of a point grid.

Frames: the image embedding is a 64 x 64 grid of cells, each 16 x 16 pixels of the (resized, unpadded
at the top-left) model input; the model input is the original image scaled by input_size / original_size.
Points are returned as (x, y) in original-image pixels, the frame MaskGenerator's prompts use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from samkit.errors import CheckpointError, InputError
from samkit.models.prompt_head import PromptHead

CELL = 16  # model-input pixels per embedding cell
HEAD_FILE = Path(__file__).resolve().parent.parent / "weights" / "prompt_head_vit_t.safetensors"


@dataclass(frozen=True)
class PeakSettings:
    """How peaks become prompts: candidates whose probability is at least `threshold` and the largest in
    their (2 * nms_radius + 1)^2 neighbourhood, best first, at least `min_points` (the best peaks even
    when below the threshold) and at most `max_points`. The candidates are the embedding's cells
    (`grid` 0; a prompt at a cell's centre) or the points of the grid mode's `grid` x `grid` point grid,
    each scored by the cell it falls in (`nms_radius` then counts grid steps). With `cover`, candidates
    inside a mask already found are skipped as they come up (see `take_round`)."""

    # The grid's own 32 x 32 points, no suppression between neighbours (a kept mask's best point is often
    # next to another's); 136 points decoded, more only while they keep finding new masks (`yield_after`,
    # below) up to 320, on crowded images up to 64 more (`refill`), then at most 40 boxes: under a fifth of
    # the grid's time. These settings and the threshold were chosen on held-out training-split images (never
    # an evaluation split); the threshold stops early on images the head finds little in, at no loss of
    # recall there.
    threshold: float = 0.03
    nms_radius: int = 0
    min_points: int = 64
    max_points: int = 320
    grid: int = 32
    # MaskGenerator decodes the candidates best first, `round_points` at a time, and with `cover` skips a
    # candidate that lies inside the smallest kept mask of a point decoded before it (it would mostly find
    # that mask again); `max_points` then bounds the points decoded, not the candidates.
    cover: bool = True
    round_points: int = 4
    # A candidate is skipped once it lies inside the kept masks of `cover_hits` decoded points (1: the first),
    # or inside one over `cover_hits_max_area` of the image. 2 finds each small object from two points, and
    # the better of their masks is kept: more recall on crowded small objects, for more prompts. (In the
    # refill, where any kept mask of a point covers, each mask counts.)
    cover_hits: int = 1
    cover_hits_max_area: float = 1.0
    # A smallest kept mask over more than this share of the image covers nothing: a point whose only kept
    # mask is (nearly) the whole image says nothing about the objects in it.
    cover_max_area: float = 0.5
    # A candidate is covered only if the mask also holds the points this share of a grid step (image side /
    # `grid`, or a cell) away from it on all four sides: points near a mask's edge often find a neighbour.
    cover_margin: float = 0.0
    # A kept mask covers only if its area is also at most this many times the median area of the masks kept
    # so far (0: off): on crowded images a clump's mask then leaves its nuclei to later points.
    cover_rel: float = 0.0
    # A kept mask covers only if its predicted IoU is at least this (0: any): a low-scored mask is often two
    # objects (two touching nuclei), and a point inside it may find one of them alone.
    cover_min_iou: float = 0.92
    # After the points, up to `boxes` box prompts: the boxes of the decoded points' masks (all three of each
    # point with a mask above pred_iou_thresh, whether they pass the filters or not) that cover at least
    # `box_min_area` of the image and that no mask passing the filters already has (box IoU below
    # `box_match`), best predicted IoU first and box-NMS'd, each decoded as a box (one mask). A large
    # object's whole mask seldom passes the filters from a point; from its box it often does.
    boxes: int = 40
    box_min_area: float = 0.002
    box_match: float = 0.8
    # Past `yield_after` points decoded (0: never), a round is decoded only while the last `yield_window`
    # points decoded found at least `min_yield` new masks per point (masks passing the filters whose box
    # overlaps no box found before by box_nms_thresh or more): dense images go on, the rest stop.
    # `max_points` stays the limit.
    yield_after: int = 136
    yield_window: int = 16
    min_yield: float = 0.125
    # Dense images (at least `refill_after` new masks once the rounds end): up to `refill` more points (0:
    # none), decoded in rounds under the yield rule (from its first window on) before the boxes: the
    # midpoints between the grid's points and the grid points not yet decoded (skipped ones too), best
    # first, that are above the threshold and in no kept mask of at most `cover_max_area` (small objects
    # between grid points, or not reached before the rounds ended).
    refill: int = 64
    refill_after: int = 128
    # In the refill, a kept mask covers only if its area is at most this many times the median area of the
    # masks kept so far (0: any up to `cover_max_area`): a clump's mask then leaves its nuclei to the refill.
    refill_cover_rel: float = 1.5
    # Then up to `split` more points (0: none): in each point's smallest kept mask of at most `split_max_area`
    # of the image, the grid point not yet decoded that lies farthest from the point inside it, where that is
    # at least `split_min_dist` times the square root of the mask's area away (a mask two objects share, or
    # found from its edge); best-scored first. A clump's mask then gets a point in its other object. Only as
    # many as keep the points decoded (rounds, refill, fill and split) at most `split_until` (0: no limit): images
    # the rounds end early on get them, crowded ones and most photos none. Off by default: split=64 gained 0.1
    # point on the evaluation splits, for 3% (photos) to 12% (nuclei) more prompts on held-out training
    # images.
    # After the rounds and the refill, up to `fill` points (0: none), one in each of the `fill_grid` x
    # `fill_grid` parts of the image where at least `fill_share` of the grid's points lie in no kept mask:
    # its best-scored such point not yet decoded, best first. Large uniform regions (road, sky), whose points
    # the head ranks alike and low, then get a point. Off by default: fill=16 recovered a third of the gap to
    # the grid on the held-out street scenes it was chosen on, but nothing on 46 others, and photos decode
    # 1.3% more for no recall.
    fill: int = 0
    fill_grid: int = 4
    fill_share: float = 0.75
    split: int = 0
    split_max_area: float = 0.1
    split_min_dist: float = 0.8
    split_until: int = 144
    # Then, with a head that has a box branch, up to `head_boxes` box prompts of its own (0: none): the
    # box the head gives each candidate at or above the threshold (the object it lies in), those of at most
    # `head_box_max_area` of the image whose box IoU with every mask found so far is under `head_box_match`,
    # box-NMS'd by score. Only when the head's boxes agree with what was found (`head_box_trust`: at least
    # that share of its box-NMS'd boxes match a found mask): on photos they seldom do, and the budget is
    # kept. A nucleus the points found only inside its clump's mask then gets a prompt of its own.
    head_boxes: int = 64
    head_box_match: float = 0.5
    head_box_max_area: float = 1.0
    head_box_trust: float = 0.4


PEAK_DEFAULTS = PeakSettings()


def parse_peaks(text: str, base: PeakSettings = PEAK_DEFAULTS) -> PeakSettings:
    """`base` with the fields given as "KEY=VALUE,KEY=VALUE" (the CLI's `--peaks`; "" gives `base`), each
    value converted to its field's type; an unknown key or a bad value raises InputError in one line."""
    fields = {f.name: type(getattr(PEAK_DEFAULTS, f.name)) for f in dataclasses.fields(PeakSettings)}
    changes: dict[str, Any] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = (t.strip() for t in pair.partition("="))
        if not sep or key not in fields:
            raise InputError(f"peaks takes KEY=VALUE pairs of {', '.join(fields)}; got {pair!r}")
        kind = fields[key]
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0", "on", "off"):
                    raise ValueError(value)
                changes[key] = value.lower() in ("true", "1", "on")
            else:
                changes[key] = kind(value)
        except ValueError:
            raise InputError(f"peaks: {key} needs {kind.__name__}, got {value!r}") from None
    return dataclasses.replace(base, **changes)


HEAD_FORMAT = "samkit-prompt-head"  # a head file's `format` metadata


def head_metadata(model: Any) -> dict[str, str]:
    """What a head file records of the `Sam` model whose embeddings it was trained on: its name and its
    architecture's id (`embedding_file.config_id`)."""
    from samkit.embedding_file import config_id

    return {"format": HEAD_FORMAT, "model": model.arch or "custom", "model_config": config_id(model)}


def save_head(head: PromptHead, path: str | Path, trained_for: dict[str, str] | None) -> Path:
    """Write `head` to `path` (safetensors, atomically) with `trained_for`
    (`head_metadata` of its model; None: not recorded) in the file's metadata."""
    from safetensors.torch import save

    from samkit.formats import atomic_write_bytes

    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    return atomic_write_bytes(path, save(state, metadata=trained_for))


def load_head(path: str | Path | None = None, device: torch.device | str = "cpu") -> PromptHead:
    """The shipped head (trained on vit_t's embeddings; `path` None or "") or one saved at `path`
    (safetensors); its `trained_for` is what the file records of its model (None if nothing)."""
    from samkit.zoo import read_state_dict

    path = Path(path) if path else HEAD_FILE
    if not path.is_file():
        raise InputError(f"prompt head file not found: {path}")
    state, meta = read_state_dict(path)  # a damaged file: CheckpointError, one line
    head = PromptHead(boxes="box_out.weight" in state)  # a head trained without the box branch has none
    try:
        head.load_state_dict(state)
    except RuntimeError:
        raise CheckpointError(
            f"{path} is not a prompt head file (its tensors are not a PromptHead's); train one with "
            "`samkit train configs/prompt_head.yaml`"
        ) from None
    if meta.get("format") == HEAD_FORMAT:
        head.trained_for = {k: meta.get(k, "") for k in ("format", "model", "model_config")}
    return head.eval().to(device)


def check_head(head: PromptHead, model: Any) -> None:
    """Raise InputError if `head` records a model of another architecture than `model`'s: its scores on
    that model's embeddings would mean nothing. A head that records none is taken as it is."""
    from samkit.embedding_file import config_id

    made = head.trained_for
    if not made or not made.get("model_config") or made["model_config"] == config_id(model):
        return
    raise InputError(
        f"the prompt head was trained on {made.get('model') or 'another model'}'s embeddings, not this "
        f"{model.arch or 'custom'} model's: train one for it (samkit train configs/prompt_head.yaml "
        "--set model=...) and pass it as prompt_head (CLI: --prompt-head), or use grid prompts"
    )


def _input_scale(original_size: tuple[int, int], input_size: tuple[int, int]) -> np.ndarray:
    """(2,) float64 model-input pixels per original pixel along x and y."""
    return np.array([input_size[1] / original_size[1], input_size[0] / original_size[0]])


def points_to_cells(
    points: np.ndarray, original_size: tuple[int, int], input_size: tuple[int, int]
) -> np.ndarray:
    """(N, 2) (x, y) original-image pixels -> (N, 2) (x, y) in embedding-cell units (cell i spans
    [i, i + 1))."""
    scale = _input_scale(original_size, input_size)
    return np.asarray(points, dtype=np.float64).reshape(-1, 2) * scale / CELL


def cells_to_points(
    cells: np.ndarray, original_size: tuple[int, int], input_size: tuple[int, int]
) -> np.ndarray:
    """(N, 2) integer (col, row) cells -> (N, 2) float64 (x, y) original-image pixels of the cells'
    centres, clipped into the image."""
    scale = _input_scale(original_size, input_size)
    pts = (np.asarray(cells, dtype=np.float64).reshape(-1, 2) + 0.5) * CELL / scale
    upper = np.array([original_size[1], original_size[0]], dtype=np.float64) - 0.5
    return np.clip(pts, 0.0, upper)


def _ranked(prob: torch.Tensor, nms_radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into (rows, cols) `prob` of all its local maxima, best first, and their probabilities."""
    k = 2 * nms_radius + 1
    local_max = F.max_pool2d(prob[None, None], k, stride=1, padding=nms_radius)[0, 0]
    scores = torch.where(prob >= local_max, prob, torch.full_like(prob, -1.0)).flatten()
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[: int((scores >= 0).sum())]
    return order, scores[order]


def _top(prob: torch.Tensor, settings: PeakSettings) -> torch.Tensor:
    """Flat indices into (rows, cols) `prob` of its local maxima, best first, as many as `settings` say."""
    order, scores = _ranked(prob, settings.nms_radius)
    n_above = int((scores >= settings.threshold).sum())
    return order[: min(max(n_above, settings.min_points), settings.max_points)]


def take_round(
    probs: np.ndarray,
    available: np.ndarray,
    decoded: int,
    settings: PeakSettings,
    rounds: Sequence[tuple[int, int]] = (),
) -> np.ndarray:
    """The candidates to decode next (indices, best first): of the candidates still available (`available`, bool, not
    decoded nor covered; `probs` sorted best first), those at or above the threshold, or any while fewer
    than `min_points` have been `decoded`; at most `round_points` and never past `max_points` in all; none
    once `recent_yield(rounds)` is under `min_yield` past `yield_after` points (`rounds`: (points, new
    masks) of each round decoded, in order)."""
    room = min(settings.round_points, settings.max_points - decoded)
    if settings.yield_after and decoded >= settings.yield_after:
        if recent_yield(rounds, settings.yield_window) < settings.min_yield:
            room = 0
    if room <= 0:
        return np.zeros(0, dtype=np.int64)
    free = np.flatnonzero(available)
    n_above = int((probs[free] >= settings.threshold).sum())
    return free[: min(room, max(n_above, settings.min_points - decoded))]


def recent_yield(rounds: Sequence[tuple[int, int]], window: int) -> float:
    """New masks per point over the last rounds that together decoded at least `window` points (all of
    them if fewer); `rounds` holds (points, new masks) per round, in order. 0 with no rounds."""
    points = found = 0
    for n, new in reversed(rounds):
        points, found = points + n, found + new
        if points >= window:
            break
    return found / points if points else 0.0


def grid_cells(
    original_size: tuple[int, int], input_size: tuple[int, int], n: int, side: int, between: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The grid mode's n x n points over the image and the embedding cell each falls in: xs (n,) and ys (n,)
    original-image pixels (point k = row k // n, column k % n is at (xs[k % n], ys[k // n])), and
    cells (n * n,) int64 flat indices row * side + col into a (side, side) heat map. `between`: the
    (n - 1) x (n - 1) midpoints between those points instead (n - 1 in place of n above)."""
    frac = np.arange(1, n) / n if between else (np.arange(n) + 0.5) / n
    xs, ys = frac * original_size[1], frac * original_size[0]
    scale = _input_scale(original_size, input_size)
    cols = np.minimum(np.floor(xs * scale[0] / CELL), side - 1).astype(np.int64)
    rows = np.minimum(np.floor(ys * scale[1] / CELL), side - 1).astype(np.int64)
    return xs, ys, (rows[:, None] * side + cols[None, :]).reshape(-1)


def pick_grid_indices(
    logits: torch.Tensor,
    original_size: tuple[int, int],
    input_size: tuple[int, int],
    settings: PeakSettings,
) -> np.ndarray:
    """(K,) int64 indices (row * grid + column) of the best points of the `settings.grid`-per-side point
    grid under a heat-map logit tensor (side, side), best first."""
    _, _, prob = _grid_prob(logits, original_size, input_size, settings.grid)
    return _top(prob, settings).numpy()


def _grid_prob(
    logits: torch.Tensor,
    original_size: tuple[int, int],
    input_size: tuple[int, int],
    n: int,
    between: bool = False,
) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """The grid points' xs and ys (`grid_cells`) and the heat map's probability at each, (m, m) for the
    m = len(xs) points per side."""
    xs, ys, cells = grid_cells(original_size, input_size, n, logits.shape[-1], between)
    m = len(xs)
    prob = torch.sigmoid(logits.detach().float().cpu()).flatten()[torch.as_tensor(cells)].reshape(m, m)
    return xs, ys, prob


def _grid_ranked(
    xs: np.ndarray, ys: np.ndarray, prob: torch.Tensor, nms_radius: int
) -> tuple[np.ndarray, np.ndarray]:
    """The points of a (len(ys), len(xs)) grid that `_ranked` keeps, best first: (K, 2) float64 (x, y)
    and (K,) float64 probabilities."""
    order, scores = _ranked(prob, nms_radius)
    idx = order.numpy()
    m = len(xs)
    return np.stack([xs[idx % m], ys[idx // m]], axis=1).reshape(-1, 2), scores.double().numpy()


def between_candidates(
    logits: torch.Tensor, original_size: tuple[int, int], input_size: tuple[int, int], n: int
) -> tuple[np.ndarray, np.ndarray]:
    """The midpoints between the n x n grid's points, best first: (K, 2) float64 (x, y) original-image
    pixels and (K,) float64 probabilities under a (side, side) heat-map logit tensor."""
    return _grid_ranked(*_grid_prob(logits, original_size, input_size, n, between=True), nms_radius=0)


def grid_candidates(
    logits: torch.Tensor,
    original_size: tuple[int, int],
    input_size: tuple[int, int],
    settings: PeakSettings,
) -> tuple[np.ndarray, np.ndarray]:
    """Every candidate prompt `settings` allow, best first: (K, 2) float64 (x, y) original-image pixels and
    (K,) float64 probabilities (grid points when `settings.grid`, else cell centres over the image)."""
    if settings.grid:
        prob_at = _grid_prob(logits, original_size, input_size, settings.grid)
        return _grid_ranked(*prob_at, settings.nms_radius)
    rows, cols = (-(-s // CELL) for s in input_size)
    prob = torch.sigmoid(logits.detach().float().cpu())
    order, scores = _ranked(prob[:rows, :cols], settings.nms_radius)
    cells_ = torch.stack([order % cols, order // cols], dim=1).numpy()
    points = cells_to_points(cells_, original_size, input_size)
    return points.reshape(-1, 2), scores.double().numpy()


@torch.inference_mode()
def learned_candidates(
    head: PromptHead,
    embedding: torch.Tensor,
    original_size: tuple[int, int],
    input_size: tuple[int, int],
    settings: PeakSettings = PEAK_DEFAULTS,
) -> tuple[np.ndarray, np.ndarray]:
    """`grid_candidates` of the head's heat map for one image (`embedding`: (1, 256, 64, 64) from the model
    the head was trained on)."""
    return grid_candidates(head_logits(head, embedding), original_size, input_size, settings)


def head_logits(head: PromptHead, embedding: torch.Tensor) -> torch.Tensor:
    """The head's (side, side) heat-map logits for one image's (1, 256, side, side) embedding, run on the
    head's own device and dtype."""
    return head(_head_input(head, embedding))[0, 0]


def head_extents(head: PromptHead, embedding: torch.Tensor) -> torch.Tensor:
    """The head's box branch (4, side, side) log extents for one image's (1, 256, side, side) embedding, run
    on the head's own device and dtype (`PromptHead.extents`)."""
    return head.extents(_head_input(head, embedding))[0]


def _head_input(head: PromptHead, embedding: torch.Tensor) -> torch.Tensor:
    """`embedding` on the head's device, in its dtype."""
    param = next(head.parameters())
    return embedding.to(device=param.device, dtype=param.dtype)


def point_boxes(
    extents: torch.Tensor,
    points: np.ndarray,
    original_size: tuple[int, int],
    input_size: tuple[int, int],
) -> np.ndarray:
    """The head's box for each point: `extents` (4, side, side) from `PromptHead.extents`, `points` (N, 2)
    (x, y) original-image pixels -> (N, 4) float64 XYXY in the model-input frame (clipped to the image
    there): the point moved by the distances its cell gives to the left, top, right and bottom edges."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2) * _input_scale(original_size, input_size)
    side_r, side_c = extents.shape[-2:]
    cells = np.floor(points_to_cells(points, original_size, input_size))
    cols = np.clip(cells[:, 0], 0, side_c - 1).astype(np.int64)
    rows = np.clip(cells[:, 1], 0, side_r - 1).astype(np.int64)
    dist = np.exp(extents.detach().float().cpu()[:, rows, cols].T.double().numpy()) * CELL
    boxes = np.concatenate([p - dist[:, :2], p + dist[:, 2:]], axis=1)
    upper = [input_size[1], input_size[0]] * 2
    return np.clip(boxes, 0.0, np.array(upper, dtype=np.float64))


def box_extent_targets(
    boxes: np.ndarray, points: np.ndarray, original_size: tuple[int, int], input_size: tuple[int, int]
) -> np.ndarray:
    """The inverse of `point_boxes` for training: (P, 4) XYXY original-pixel boxes (NaN: none) around (P, 2)
    points -> (P, 4) float32 log distances in cells (left, top, right, bottom), each at least 1 model-input
    pixel; NaN rows stay NaN."""
    scale = _input_scale(original_size, input_size)
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2) * scale
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * np.concatenate([scale, scale])
    dist = np.concatenate([p - b[:, :2], b[:, 2:] - p], axis=1)
    with np.errstate(invalid="ignore"):
        return np.log(np.clip(dist, 1.0, None) / CELL).astype(np.float32)


def pick_grid_points(
    logits: torch.Tensor,
    original_size: tuple[int, int],
    input_size: tuple[int, int],
    settings: PeakSettings,
) -> np.ndarray:
    """The best points of the `settings.grid`-per-side point grid (the grid mode's layout over the image)
    under a heat-map logit tensor (side, side), as (K, 2) float64 (x, y) original-image pixels, best first."""
    n = settings.grid
    xs, ys, _ = grid_cells(original_size, input_size, n, logits.shape[-1])
    idx = pick_grid_indices(logits, original_size, input_size, settings)
    return np.stack([xs[idx % n], ys[idx // n]], axis=1)


def pick_peaks(
    logits: torch.Tensor, input_size: tuple[int, int], settings: PeakSettings = PEAK_DEFAULTS
) -> np.ndarray:
    """Peaks of a (64, 64) heat-map logit tensor, as (K, 2) int64 (col, row) cells, best first.

    Only cells over the image (not the padding right of and below `input_size`) are candidates."""
    prob = torch.sigmoid(logits.detach().float().cpu())
    rows, cols = (-(-s // CELL) for s in input_size)
    idx = _top(prob[:rows, :cols], settings)
    return torch.stack([idx % cols, idx // cols], dim=1).numpy().astype(np.int64)


@torch.inference_mode()
def learned_points(
    head: PromptHead,
    embedding: torch.Tensor,
    original_size: tuple[int, int],
    input_size: tuple[int, int],
    settings: PeakSettings = PEAK_DEFAULTS,
) -> np.ndarray:
    """(K, 2) float64 (x, y) original-image pixels: the prompts the head ranks best for one image, as many
    as `settings` allow before any is skipped as covered or the yield rule ends the rounds (what
    MaskGenerator decodes with `cover=False` and `yield_after=0`;
    `embedding`: (1, 256, 64, 64) from the same model the head was trained on)."""
    return pick_points(head_logits(head, embedding), original_size, input_size, settings)


def pick_points(
    logits: torch.Tensor,
    original_size: tuple[int, int],
    input_size: tuple[int, int],
    settings: PeakSettings = PEAK_DEFAULTS,
) -> np.ndarray:
    """(K, 2) float64 (x, y) original-image pixels, best first: the prompts `settings` pick from a (side, side)
    heat-map logit tensor (grid points when `settings.grid`, else cell centres)."""
    if settings.grid:
        return pick_grid_points(logits, original_size, input_size, settings)
    return cells_to_points(pick_peaks(logits, input_size, settings), original_size, input_size)
