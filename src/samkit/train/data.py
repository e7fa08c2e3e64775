"""Training data: sources of (image, object masks), a weighted mix of them, and augmentation.

A source is random-access: `source[i]` -> `Sample` with the image (H, W, 3) uint8 RGB and its object
masks (N, H, W) bool in the same original-image pixels. Sources are built from config specs by
`build_source`; every random choice is drawn from a numpy Generator passed in by the caller, so a step's
data depends only on (seed, step) and a resumed run sees exactly the data it would have seen.
"""

from __future__ import annotations

import hashlib
import json
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from samkit.errors import InputError, SamkitError
from samkit.image import IMAGE_SUFFIXES, load_image
from samkit.train.config import AugmentConfig, ConfigError, DataConfig
from samkit.train.source import Sample, Source, stack_masks
from samkit.train.synthetic import CopyPasteSource, SyntheticSource
from samkit.transforms import ResizeLongestSide


def _slice(items: list, spec: dict[str, Any]) -> list:
    """Apply the spec's `range: [start, stop]` (Python slice of the sorted item list) to `items`."""
    rng = spec.get("range")
    if rng is None:
        return items
    start, stop = (list(rng) + [None, None])[:2]
    return items[slice(start, stop)]


class CocoSource(Source):
    """COCO instances JSON (polygons or RLE, decoded by pycocotools); crowd annotations are skipped.

    Images are looked up in `images/` next to the JSON (or `image_dir`). Images without a non-crowd object
    are left out.
    """

    def __init__(self, annotations: Path, image_dir: Path | None = None, spec: dict | None = None) -> None:
        try:
            data = json.loads(annotations.read_text())
            images = sorted(data["images"], key=lambda im: im["id"])
            anns = data["annotations"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"cannot read COCO annotations {annotations}: {exc}") from None
        self.name = f"coco:{annotations.resolve()}"
        self.image_dir = image_dir or annotations.parent / "images"
        self.anns: dict[int, list[dict]] = {}
        for ann in sorted(anns, key=lambda a: a["id"]):
            if not ann.get("iscrowd", 0):
                self.anns.setdefault(ann["image_id"], []).append(ann)
        self.images = _slice([im for im in images if im["id"] in self.anns], spec or {})

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Sample:
        from pycocotools import mask as mask_utils

        info = self.images[i]
        h, w = info["height"], info["width"]
        masks = []
        for ann in self.anns[info["id"]]:
            seg = ann["segmentation"]
            if isinstance(seg, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
            elif isinstance(seg.get("counts"), list):
                rle = mask_utils.frPyObjects(seg, h, w)
            else:
                rle = seg
            masks.append(mask_utils.decode(rle).astype(bool))
        image = load_image(self.image_dir / info["file_name"])
        return Sample(f"{self.name}/{info['id']}", image, stack_masks(masks, h, w))


class Sa1bSource(Source):
    """SA-1B folder: `<name>.jpg` + `<name>.json` pairs, read with `samkit.formats.read_sa1b`."""

    def __init__(self, root: Path, spec: dict | None = None) -> None:
        pairs = []
        for js in sorted(root.glob("*.json")):
            image = _image_for(root, js.stem)
            if image is not None:
                pairs.append((js, image))
        self.name = f"sa1b:{root.resolve()}"
        self.pairs = _slice(pairs, spec or {})

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> Sample:
        from samkit.formats import read_sa1b, sa1b_masks

        js, image_path = self.pairs[i]
        masks = sa1b_masks(read_sa1b(js))
        image = load_image(image_path)
        return Sample(f"{self.name}/{js.stem}", image, masks[masks.reshape(len(masks), -1).any(1)])


def _image_for(folder: Path, stem: str) -> Path | None:
    return next(
        (p for p in sorted(folder.glob(stem + ".*")) if p.suffix.lower() in IMAGE_SUFFIXES),
        None,
    )


def _read_object_png(path: Path) -> np.ndarray:
    """Object pixels of a mask PNG: 0 is background, 128 is RITM's "ignore" band (not object), else object."""
    label = np.asarray(Image.open(path).convert("L"))
    return (label > 0) & (label != 128)


class MaskFolderSource(Source):
    """Image + mask PNG folders: `images/<stem>.<ext>` with either `masks/<stem>.png` (one object, the
    RITM layout) or `masks/<stem>_<k>.png` (one PNG per object, k = 0, 1, ...). Pixel 0 is background,
    128 is treated as background (RITM's ignore band), any other value is the object.
    """

    def __init__(self, root: Path, spec: dict | None = None) -> None:
        groups: dict[str, list[Path]] = {}
        images = {
            p.stem: p for p in sorted((root / "images").glob("*")) if p.suffix.lower() in IMAGE_SUFFIXES
        }
        for mask in sorted((root / "masks").glob("*.png")):
            stem = mask.stem
            if stem not in images and "_" in stem and stem.rsplit("_", 1)[0] in images:
                stem = stem.rsplit("_", 1)[0]
            if stem in images:
                groups.setdefault(stem, []).append(mask)
        self.name = f"masks:{root.resolve()}"
        self.root = root
        self.items = _slice([(images[s], groups[s]) for s in sorted(groups)], spec or {})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        image_path, mask_paths = self.items[i]
        image = load_image(image_path)
        masks = [_read_object_png(p) for p in mask_paths]
        return Sample(f"{self.name}/{image_path.stem}", image, stack_masks(masks, *image.shape[:2]))


class ImageFolderSource(Source):
    """Every image in a folder (sorted, not recursive) with no masks: data for encoder distillation, which
    needs only the teacher's embeddings."""

    def __init__(self, root: Path, spec: dict | None = None) -> None:
        self.name = f"images:{root.resolve()}"
        paths = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        self.items = _slice(paths, spec or {})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        image = load_image(self.items[i])
        return Sample(f"{self.name}/{self.items[i].name}", image, np.zeros((0, *image.shape[:2]), bool))


class Bsds500Source(Source):
    """BSDS500 `train`/`val` splits: every region of every annotator is one mask.

    Image ids in `eval-overlap.txt` (BSDS images that are also in GrabCut/Berkeley) are always skipped.
    """

    def __init__(
        self, root: Path, splits: Sequence[str] = ("train", "val"), spec: dict | None = None
    ) -> None:
        if "test" in splits:
            raise ConfigError("bsds500 `test` is an evaluation split; train on train and val only")
        overlap_file = root / "eval-overlap.txt"
        overlap = set(overlap_file.read_text().split()) if overlap_file.is_file() else set()
        mats = [
            m
            for s in splits
            for m in sorted((root / "groundTruth" / s).glob("*.mat"))
            if m.stem not in overlap
        ]
        self.name = f"bsds500:{root.resolve()}"
        self.root = root
        self.mats = _slice(mats, spec or {})

    def __len__(self) -> int:
        return len(self.mats)

    def __getitem__(self, i: int) -> Sample:
        from scipy.io import loadmat

        mat = self.mats[i]
        cells = loadmat(str(mat))["groundTruth"]
        masks = []
        for k in range(cells.shape[1]):
            seg = np.asarray(cells[0, k]["Segmentation"][0, 0])
            masks.extend(seg == label for label in np.unique(seg))
        image = load_image(self.root / "images" / mat.parent.name / f"{mat.stem}.jpg")
        return Sample(f"{self.name}/{mat.stem}", image, stack_masks(masks, *image.shape[:2]))


# --- the mix --------------------------------------------------------------------------------------------


_EVAL_MARKERS = ("interactive",)


def _refuse_eval_split(path: Path) -> None:
    """Refuse the shared data sets' evaluation splits (see ../shared/datasets/README.md)."""
    parts = path.resolve().parts
    if "datasets" in parts:
        rest = parts[parts.index("datasets") + 1 :]
        if (
            (rest and rest[0] in _EVAL_MARKERS)
            or (len(rest) >= 3 and rest[0] == "instances" and rest[2] == "val")
            or (rest[:1] == ("bsds500",) and "test" in rest[1:])
        ):
            raise ConfigError(
                f"{path} is an evaluation split; never train or validate on it (use a train split, "
                "holding images out with `range:`)"
            )


def build_source(spec: dict[str, Any], base: Path | None = None) -> Source:
    """A source from its config spec. `type` is one of coco, sa1b, masks, bsds500, images, synthetic,
    copy_paste.

    coco: `path` (annotations JSON or the folder holding annotations.json), optional `images`.
    sa1b / masks / bsds500: `path` (a folder; bsds500 also `splits`, default [train, val]).
    images: `path`, a folder of images without masks (encoder distillation only).
    synthetic: `count`, `size` (longest side), `seed`, `max_shapes`, `textured`. copy_paste: `objects` and `backgrounds` (specs),
    `count`, `max_objects`, `seed`. Any file source takes `range: [start, stop]` (a slice of its sorted
    images), which is how a held-out validation part of a train split is named.
    """
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"a data source needs a `type:`, got {spec!r}")
    kind = spec["type"]
    if kind == "synthetic":
        return SyntheticSource(
            int(spec.get("count", 64)),
            int(spec.get("size", 256)),
            int(spec.get("seed", 0)),
            int(spec.get("max_shapes", 6)),
            bool(spec.get("textured", True)),
        )
    if kind == "copy_paste":
        return CopyPasteSource(
            build_source(spec["objects"], base),
            build_source(spec["backgrounds"], base),
            int(spec.get("count", 256)),
            int(spec.get("max_objects", 4)),
            int(spec.get("seed", 0)),
        )
    if "path" not in spec:
        raise ConfigError(f"data source {kind!r} needs a `path:`")
    path = Path(spec["path"]).expanduser()
    if not path.is_absolute() and base is not None and not path.exists():
        path = base / path
    if not path.exists():
        raise ConfigError(f"data source path not found: {path}")
    _refuse_eval_split(path)
    if kind == "coco":
        ann = path / "annotations.json" if path.is_dir() else path
        images = Path(spec["images"]) if spec.get("images") else None
        source: Source = CocoSource(ann, images, spec)
    elif kind == "sa1b":
        source = Sa1bSource(path, spec)
    elif kind == "masks":
        source = MaskFolderSource(path, spec)
    elif kind == "bsds500":
        source = Bsds500Source(path, tuple(spec.get("splits", ("train", "val"))), spec)
    elif kind == "images":
        source = ImageFolderSource(path, spec)
    else:
        raise ConfigError(
            f"unknown data source type {kind!r}: use coco, sa1b, masks, bsds500, images, synthetic or "
            "copy_paste"
        )
    if len(source) == 0:
        what = "images" if kind == "images" else "images with masks"
        raise ConfigError(f"data source {path} ({kind}) holds no {what}")
    source.selection = spec.get("range")
    return source


class Mix:
    """Several sources sampled with weights (each spec's `weight`, default 1), with replacement."""

    def __init__(self, sources: Sequence[Source], weights: Sequence[float]) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if len(sources) == 0 or (w <= 0).any():
            raise ConfigError("data.train needs at least one source, each with a positive weight")
        self.sources = list(sources)
        self.p = w / w.sum()

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def draw(self, rng: np.random.Generator) -> tuple[int, int]:
        """(source index, item index) of one random image."""
        s = int(rng.choice(len(self.sources), p=self.p))
        return s, int(rng.integers(len(self.sources[s])))


# --- augmentation and the input frame -------------------------------------------------------------------


def augment_params(aug: AugmentConfig, rng: np.random.Generator) -> dict[str, Any]:
    """Draw one augmentation: scale factor, crop anchor, flips and colour factors."""
    lo, hi = aug.scale
    c = aug.color
    return {
        "scale": float(rng.uniform(lo, hi)),
        "anchor": rng.random(2),
        "hflip": bool(rng.random() < aug.hflip),
        "vflip": bool(rng.random() < aug.vflip),
        "color": rng.uniform(1 - c, 1 + c, size=3) if c > 0 else None,
    }


def to_input_frame(
    image: np.ndarray,
    masks: np.ndarray,
    image_size: int,
    params: dict[str, Any] | None = None,
    interpolation: str = "bilinear",
) -> tuple[np.ndarray, np.ndarray]:
    """Resize so the longest side is `image_size` (x the jitter scale), crop to fit, flip and colour.

    image: (H, W, 3) uint8; masks: (N, H, W) bool. Returns the image (h, w, 3) uint8 and masks (N, h, w)
    with max(h, w) <= image_size, in the model-input frame (before padding). `interpolation` is the
    model's `resize`; without `params` this is exactly the Predictor's resize.
    """
    p = params or {"scale": 1.0, "anchor": np.zeros(2), "hflip": False, "vflip": False, "color": None}
    long_side = max(8, round(image_size * p["scale"]))
    out = ResizeLongestSide(long_side, interpolation).apply_image(image)
    h, w = out.shape[:2]
    if len(masks):
        stacked = np.ascontiguousarray(masks.transpose(1, 2, 0).astype(np.uint8))
        chunks = [
            cv2.resize(stacked[..., k : k + 256], (w, h), interpolation=cv2.INTER_NEAREST).reshape(h, w, -1)
            for k in range(0, stacked.shape[2], 256)
        ]
        m = np.concatenate(chunks, axis=2).transpose(2, 0, 1).astype(bool)
    else:
        m = np.zeros((0, h, w), dtype=bool)
    ch, cw = min(h, image_size), min(w, image_size)
    y0, x0 = int(p["anchor"][0] * (h - ch)), int(p["anchor"][1] * (w - cw))
    out, m = out[y0 : y0 + ch, x0 : x0 + cw], m[:, y0 : y0 + ch, x0 : x0 + cw]
    if p["hflip"]:
        out, m = out[:, ::-1], m[:, :, ::-1]
    if p["vflip"]:
        out, m = out[::-1], m[:, ::-1]
    if p["color"] is not None:
        out = _color(out, p["color"])
    return np.ascontiguousarray(out), np.ascontiguousarray(m)


def _color(image: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Brightness, contrast and saturation jitter by the three factors."""
    x = image.astype(np.float32) * factors[0]
    x = (x - x.mean()) * factors[1] + x.mean()
    gray = x.mean(axis=2, keepdims=True)
    x = (x - gray) * factors[2] + gray
    return np.clip(x, 0, 255).astype(np.uint8)


# --- step batches ---------------------------------------------------------------------------------------

Batch = list[tuple[str, np.ndarray, np.ndarray]]


@dataclass
class BatchDrawer:
    """Draws the images and masks of one training step from the step's generator.

    A batch is a list of (key, input-frame image (h, w, 3) uint8, masks (M, h, w) bool), max(h, w) <=
    `image_size`. With `cached` (the embedding-cache modes) an image is one of `data.cache_variants` fixed
    versions (0 = unaugmented), named by `key` in the cache; otherwise it is augmented afresh every draw.
    Picklable, so worker processes can draw batches ahead of the training step.
    """

    sources: list[Source]
    mix: Mix
    data: DataConfig
    seed: int
    image_size: int
    cached: bool = False
    needs_masks: bool = True  # False in distillation: images without masks are drawn too
    resize: str = "bilinear"  # the model's interpolation to the input frame (ImagePipeline.resize)

    def variant(self, s: int, i: int, v: int, sample: Sample) -> tuple[str, dict[str, Any] | None]:
        """Cache key and augmentation of version `v` of image `i` of source `s`.

        The key names the augmentation itself, so runs that share a cache folder (other seeds, sources or
        augment settings) never reuse a differently augmented embedding."""
        if v == 0:
            return f"{sample.key}#v0", None
        params = augment_params(self.data.augment, np.random.default_rng([self.seed, s, i, v]))
        text = json.dumps({k: np.asarray(x).tolist() for k, x in params.items() if x is not None})
        return f"{sample.key}#v{v}-{hashlib.sha1(text.encode()).hexdigest()[:12]}", params

    def __call__(self, rng: np.random.Generator) -> Batch:
        want, size, variants = self.data.masks_per_image, self.data.batch_size, self.data.cache_variants
        batch: Batch = []
        for _ in range(100 * size):
            if len(batch) == size:
                break
            s, i = self.mix.draw(rng)
            sample = self.sources[s][i]
            if len(sample.masks) == 0 and self.needs_masks:
                continue
            pick = rng.permutation(len(sample.masks))[: 2 * want]
            if self.cached:
                key, params = self.variant(s, i, int(rng.integers(variants)), sample)
            else:
                key, params = sample.key, augment_params(self.data.augment, rng)
            image, masks = to_input_frame(
                sample.image, sample.masks[pick], self.image_size, params, self.resize
            )
            masks = masks[masks.reshape(len(masks), -1).sum(1) >= 4][:want] if len(masks) else masks
            if len(masks) or not self.needs_masks:
                batch.append((key, image, masks))
        if not batch:
            raise ConfigError("no usable masks found in 100 draws; check the training data")
        return batch


class _StepBatches:
    """Map-style dataset for torch's DataLoader: item s is step s's batch and the state of step s's
    generator after drawing it (the trainer goes on drawing prompts from that state)."""

    def __init__(self, drawer: BatchDrawer) -> None:
        self.drawer = drawer

    def __getitem__(self, step: int) -> tuple[Batch, dict] | SamkitError:
        rng = np.random.default_rng([self.drawer.seed, step])
        try:
            batch = self.drawer(rng)
        except SamkitError as exc:  # handed to the main process as a value: its one-line message survives
            return exc
        return batch, rng.bit_generator.state


def _as_is(item: Any) -> Any:
    return item


def _worker_init(_: int) -> None:
    # Ctrl-C reaches the whole process group: the main process finishes its step and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM to the whole group (SLURM, `kill -- -PGID`) likewise: the main process saves and stops us.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # No cv2.setNumThreads here: in a forked child it can block for good on the parent's pool lock
    # (seen in CI). step_batches sets OpenCV to one thread in the parent before forking instead.
    if sys.platform.startswith("linux"):
        # Die with the training process: if it is killed, torch's workers can otherwise block for good
        # writing a batch into a pipe that a sibling worker still holds open (seen with SIGTERM).
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def step_batches(
    drawer: BatchDrawer, start: int, stop: int, workers: int = 0
) -> Iterator[tuple[Batch, np.random.Generator]]:
    """(batch, generator) for steps start..stop-1 in order; `workers` > 0 draws them in that many worker
    processes, a few steps ahead. The result does not depend on `workers`: each step's batch comes from
    its own generator `default_rng([seed, step])`, which is handed back positioned after the draw."""
    from torch.utils.data import DataLoader

    loader = DataLoader(
        _StepBatches(drawer),  # type: ignore[arg-type]
        batch_size=None,
        sampler=range(start, stop),
        num_workers=workers,
        collate_fn=_as_is,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=2 if workers else None,
    )
    threads = cv2.getNumThreads()
    if workers:
        # Forked workers inherit this: OpenCV then runs inline in them, never touching a thread pool
        # whose locks the fork may have copied in a held state.
        cv2.setNumThreads(1)
    try:
        for step, item in zip(range(start, stop), loader, strict=True):
            if isinstance(item, SamkitError):
                raise item
            batch, state = item
            rng = np.random.default_rng([drawer.seed, step])
            rng.bit_generator.state = state
            yield batch, rng
    finally:
        cv2.setNumThreads(threads)
