"""An annotation project: the images folder, the SQLite store, the model and its cached embeddings.

Everything the web app does goes through `Project`, so it can be driven (and tested) without a browser.
Coordinates: points (x, y) and boxes XYXY in original-image pixels; stored bboxes XYWH (COCO, SA-1B).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from samkit.annotate.embeddings import EmbeddingCache
from samkit.annotate.store import ObjectRecord, Store
from samkit.embedding_file import fingerprint
from samkit.errors import (
    GoneError,
    ImageError,
    InputError,
    NotFoundError,
    PromptError,
    SamkitError,
    StateError,
)
from samkit.image import IMAGE_SUFFIXES, image_size

# Auto mode keeps a generated mask only if it overlaps every existing object by less than this IoU.
AUTO_OVERLAP_IOU = 0.5
# Seconds an auto-mode request waits for the one running before it; then 503.
AUTO_WAIT_SECONDS = 60.0


class MissingImageError(GoneError):
    """An image the project knows whose file is gone from disk."""


@dataclass(frozen=True)
class Candidate:
    """One proposed mask. rle: COCO RLE of the (H, W) mask; bbox XYWH; score: predicted IoU."""

    rle: dict[str, Any]
    bbox: list[float]
    area: int
    score: float
    stability_score: float


@dataclass(frozen=True)
class Prompt:
    """One prompt as `Predictor.predict` takes it, in image pixels: point_coords (N, 2) XY with point_labels
    (N,) 1 = foreground, 0 = background, and/or box (4,) XYXY; None where absent. Checked when predicted
    (`samkit.prompts.check_prompts`)."""

    point_coords: Any = None
    point_labels: Any = None
    box: Any = None

    def count(self) -> int:
        """Points plus the box: one is ambiguous (SAM's advice: 3 candidates), more are not."""
        points = 0 if self.point_coords is None else len(self.point_coords)
        return points + (self.box is not None)

    def as_json(self) -> dict[str, Any]:
        """The stored form (once checked): {"points": [[x, y, label], ...], "box": [x0, y0, x1, y1] | None}."""
        coords = [] if self.point_coords is None else np.asarray(self.point_coords, dtype=np.float64)
        labels = [] if self.point_labels is None else np.asarray(self.point_labels)
        points = [[float(x), float(y), int(label)] for (x, y), label in zip(coords, labels, strict=True)]
        box = None if self.box is None else [float(v) for v in self.box]
        return {"points": points, "box": box}


class Project:
    """The images under `images_dir`, annotated into the SQLite file `db_path` with `model`.

    model: a zoo name or checkpoint path for `samkit.load` (None: the default model), or a model already
    loaded with `samkit.load`. Embeddings are cached
    in `<db stem>.embeddings/` next to the database. dtype: the encoder precision `samkit.load` uses
    for a model given by name ("auto": bf16 where the hardware runs it natively, else fp32).
    """

    def __init__(
        self,
        images_dir: str | Path,
        db_path: str | Path,
        model: str | Path | Any = None,
        log: Callable[[str], None] | None = None,
        lru_size: int = 4,
        dtype: str = "auto",
    ) -> None:
        import samkit

        self.store = Store(db_path)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.root = register_images(self.store, images_dir, self.log)
        if model is None or isinstance(model, (str, Path)):
            self.model_name = None if model is None else str(model)
            self.model = samkit.load(model, dtype=dtype)
        else:  # an already loaded model, e.g. shared by several projects in one process
            self.model_name = str(getattr(model, "arch", "model"))
            self.model = model
        self._sam = samkit
        db = Path(db_path).resolve()
        self.embeddings = EmbeddingCache(
            db.parent / f"{db.stem}.embeddings",
            lambda: samkit.Predictor(self.model),
            model_tag=f"{self.model.arch}-{fingerprint(self.model)}",
            lru_size=lru_size,
            log=self.log,
        )
        self._auto_lock = threading.Lock()

    def start(self) -> None:
        """Start embedding every image present on disk, in listing order."""
        images = [(im["id"], self.root / im["path"]) for im in self.store.images()]
        self.embeddings.start([(i, p) for i, p in images if p.is_file()])

    def close(self) -> None:
        self.embeddings.stop()
        self.store.close()

    # --- images ----------------------------------------------------------------------------------------

    def images(self) -> list[dict[str, Any]]:
        """Images with status, object count, whether the file is missing and whether it is embedded."""
        out = []
        for im in self.store.images():
            missing = not (self.root / im["path"]).is_file()
            out.append({**im, "missing": missing, "embedded": self.embeddings.is_ready(im["id"])})
        return out

    def image(self, image_id: int) -> dict[str, Any]:
        im = self.store.image(image_id)
        if im is None:
            raise NotFoundError(f"no image with id {image_id} in this project")
        return im

    def resolve(self, rel: str) -> Path:
        """The file of a path relative to the images folder; refuses anything outside it or not an image."""
        try:  # a NUL byte (ValueError) or an over-long name (OSError) is no file of ours
            candidate = (self.root / rel).resolve()
            exists = candidate.is_file()
        except (OSError, ValueError):
            raise NotFoundError(f"no image file {rel[:200]!r} in the images folder") from None
        if not candidate.is_relative_to(self.root):
            raise NotFoundError(f"path {rel!r} is outside the images folder; only files under it are served")
        if candidate.suffix.lower() not in IMAGE_SUFFIXES:
            raise NotFoundError(f"{rel!r} is not an image ({', '.join(IMAGE_SUFFIXES)})")
        if not exists:
            raise MissingImageError(f"image file {rel!r} is missing from the images folder")
        return candidate

    def image_file(self, image_id: int) -> Path:
        return self.resolve(self.image(image_id)["path"])

    def open_image(self, image_id: int, annotator: str = "") -> None:
        """The annotator looks at this image: embed it next and log the event."""
        self.image_file(image_id)
        self.embeddings.prioritize(image_id)
        self.store.log_event("open", image_id, annotator=annotator)

    # --- prompts ---------------------------------------------------------------------------------------

    def predict(self, image_id: int, prompt: Prompt, multimask: bool | None = None) -> list[Candidate]:
        """Candidate masks for a prompt, best predicted IoU first.

        multimask None: 3 candidates for a single point or a lone box (ambiguous), else 1 (SAM's advice).
        """
        self.image_file(image_id)
        pred = self.embeddings.predictor(image_id)
        if multimask is None:
            multimask = prompt.count() == 1
        logits, scores, _ = pred.predict(
            prompt.point_coords,
            prompt.point_labels,
            prompt.box,
            multimask_output=multimask,
            return_logits=True,
            low_res_logits=False,
        )
        return _candidates(logits, scores)

    def accept(
        self,
        image_id: int,
        prompt: Prompt,
        candidate: int = 0,
        label: str = "object",
        annotator: str = "",
        duration_ms: float | None = None,
        multimask: bool | None = None,
    ) -> ObjectRecord:
        """Recompute the prompt's masks and store candidate `candidate` (index in `predict`'s order)."""
        cands = self.predict(image_id, prompt, multimask)
        if not 0 <= candidate < len(cands):
            raise PromptError(f"candidate must be 0..{len(cands) - 1} for this prompt, got {candidate}")
        c = cands[candidate]
        if c.area == 0:
            raise PromptError("the chosen mask is empty; add a point or pick another candidate")
        return self.store.add_object(
            image_id,
            c.rle,
            c.bbox,
            c.area,
            label=_label(label),
            predicted_iou=c.score,
            stability_score=c.stability_score,
            prompt=prompt.as_json(),
            source="manual",
            annotator=annotator,
            duration_ms=duration_ms,
        )

    # --- auto mode -------------------------------------------------------------------------------------

    def auto(
        self,
        image_id: int,
        points_per_side: int = 16,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        label: str = "object",
        annotator: str = "",
        prompts: str = "grid",
    ) -> list[ObjectRecord]:
        """Stage 2 of the data engine: run the automatic generator and pre-fill its confident masks.

        Replaces this image's earlier auto objects; skips masks overlapping a manual or imported object
        (IoU >= 0.5). prompts: "grid" (points_per_side^2 points) or "learned" (the shipped prompt head's
        points, for vit_t: a 32 x 32 grid's masks in about a fifth of its time). Returns the new objects.
        """
        if not 1 <= points_per_side <= 64:
            raise InputError(f"points_per_side must be 1..64, got {points_per_side}")
        for name, v in (
            ("pred_iou_thresh", pred_iou_thresh),
            ("stability_score_thresh", stability_score_thresh),
        ):
            if not 0.0 <= v <= 1.0:
                raise InputError(f"{name} must be in 0..1, got {v}")
        path = self.image_file(image_id)
        generator_cls = getattr(self._sam, "MaskGenerator", None)
        if generator_cls is None:
            raise SamkitError("auto mode needs samkit.MaskGenerator, which this samkit version lacks")
        generator = generator_cls(
            self.model,
            points_per_side=points_per_side,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            output_mode="coco_rle",
            prompts=prompts,
        )
        # The cached embedding of this image (waiting for it if the background queue has not reached
        # it yet) saves the generator from encoding the image again.
        embedded = self.embeddings.predictor(image_id)
        # One generator run at a time: it takes all the cores. Others wait a bounded time.
        if not self._auto_lock.acquire(timeout=AUTO_WAIT_SECONDS):
            raise StateError("auto mode is running on another image; try again when it is done")
        try:
            records = generator.generate(self._sam.load_image(path), embedded=embedded)
        finally:
            self._auto_lock.release()
        keep_against = [o.rle for o in self.store.objects(image_id) if o.source != "auto"]
        items = []
        for r in sorted(records, key=lambda r: -float(r["predicted_iou"])):
            rle = _coco_rle(r["segmentation"])
            if keep_against and _max_iou(rle, keep_against) >= AUTO_OVERLAP_IOU:
                continue
            items.append(
                {
                    "rle": rle,
                    "bbox": [float(v) for v in r["bbox"]],
                    "area": int(r["area"]),
                    "label": _label(label),
                    "predicted_iou": float(r["predicted_iou"]),
                    "stability_score": float(r["stability_score"]),
                    "prompt": {
                        "points": [[*map(float, p), 1] for p in r.get("point_coords", [])],
                        "box": None,
                    },
                }
            )
        return self.store.add_objects(
            image_id, items, source="auto", annotator=annotator, replace_source=True
        )


def register_images(store: Store, images_dir: str | Path, log: Callable[[str], None] | None = None) -> Path:
    """Add the images under `images_dir` (recursive) to the store; returns the folder, resolved.

    Links that lead outside the folder are skipped with a warning (`log`, default stderr): only files
    under it are ever served.
    """
    from samkit.engine.inputs import list_images

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    root = Path(images_dir).resolve()
    if not root.is_dir():
        raise InputError(f"images folder not found: {images_dir} (give a folder of images)")
    entries = []
    for path in list_images(root):
        target = path.resolve()
        if not target.is_relative_to(root):
            log(f"samkit annotate: skipping {path.relative_to(root)}: it links outside the images folder")
            continue
        rel = target.relative_to(root).as_posix()
        entries.append((rel, *_image_size(path)))
    store.sync_images(entries)
    store.set_meta("images_dir", str(root))
    return root


def _image_size(path: Path) -> tuple[int | None, int | None]:
    """(width, height) as viewers show the image (EXIF orientation applied, the frame of its masks), from
    the file header, or (None, None) if the file cannot be read."""
    try:
        return image_size(path)
    except ImageError:
        return None, None


def _label(label: Any) -> str:
    if not isinstance(label, str) or not label.strip() or len(label) > 200:
        raise InputError("a label must be a string of 1 to 200 characters")
    return label.strip()


def _candidates(logits: np.ndarray, scores: np.ndarray) -> list[Candidate]:
    """Masks (C, H, W) float logits and scores (C,) -> candidates sorted by predicted IoU."""
    from samkit.masks import coco_rle_areas, masks_to_coco_rle, stability_score

    masks = logits > 0.0
    stability = np.nan_to_num(stability_score(torch.from_numpy(logits), 0.0, 1.0).numpy())
    rles = masks_to_coco_rle(masks)
    encoded = [{"size": r["size"], "counts": r["counts"].encode()} for r in rles]
    boxes = mask_utils.toBbox(encoded) if encoded else np.zeros((0, 4))
    areas = coco_rle_areas(encoded)
    out = [
        Candidate(rles[i], [float(v) for v in boxes[i]], int(areas[i]), float(scores[i]), float(stability[i]))
        for i in range(len(rles))
    ]
    return sorted(out, key=lambda c: -c.score)


def _coco_rle(segmentation: Any) -> dict[str, Any]:
    from samkit.masks import to_coco_rle

    return to_coco_rle(segmentation)


def _max_iou(rle: dict[str, Any], others: Sequence[dict[str, Any]]) -> float:
    def enc(r: dict[str, Any]) -> dict[str, Any]:
        return {"size": r["size"], "counts": r["counts"].encode()}

    ious = mask_utils.iou([enc(rle)], [enc(o) for o in others], [0] * len(others))
    return float(np.max(ious)) if np.size(ious) else 0.0
