"""`run_eval`: one protocol over one data set with one model, as a JSON-able report."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from samkit.errors import InputError
from samkit.eval import protocols as P
from samkit.eval.cache import CachedPredictor
from samkit.eval.datasets import Dataset, ImageItem, ObjectItem, open_dataset
from samkit.eval.grabcut import GrabCutPredictor
from samkit.extras import require
from samkit.image import load_image

PROTOCOLS = ("single-point", "clicks", "box", "edges", "proposals")


class ProtocolError(InputError):
    """An unknown protocol, or a protocol the data set or model cannot run."""


def resolve_model(model: Any, embedding_cache: str | Path | None = None) -> tuple[Any, dict[str, Any]]:
    """A PromptModel and its metadata from a name, a checkpoint path, `"grabcut"`, a model or a predictor.

    None means the default model. A samkit model (nn.Module) is wrapped in `samkit.Predictor`, or in a
    `CachedPredictor` over the folder `embedding_cache` when one is given; an object that already has
    `set_image` and `predict` is used as it is.
    """
    if model is not None and hasattr(model, "set_image") and hasattr(model, "predict"):
        return model, {"model": getattr(model, "name", type(model).__name__), "checkpoint_sha256": None}
    if isinstance(model, str) and model == "grabcut":
        return GrabCutPredictor(), {"model": "grabcut", "checkpoint_sha256": None}
    import samkit

    meta: dict[str, Any] = {"model": None, "checkpoint_sha256": None}
    if model is None or isinstance(model, (str, Path)):
        spec = samkit.DEFAULT_MODEL if model is None else str(model)
        meta["model"] = spec
        if spec in samkit.registry():
            meta["checkpoint_sha256"] = samkit.registry()[spec].sha256
        elif Path(spec).is_file():
            meta["checkpoint_sha256"] = _sha256(Path(spec))
        # fp32 on every machine: a benchmark's figures must not depend on the CPU that ran them.
        model = samkit.load(spec, dtype="fp32")
    else:
        meta["model"] = getattr(model, "arch", type(model).__name__)
    if embedding_cache is not None:
        return CachedPredictor(model, embedding_cache), meta
    return samkit.Predictor(model), meta


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _proposer(
    predictor: Any,
    points_per_side: int | None,
    pred_iou_thresh: float | None = None,
    prompts: str = "grid",
    prompt_head: str | Path | None = None,
    peaks: str = "",
):
    """propose(item) -> (masks, scores): samkit's MaskGenerator for SAM models, else grid prompts + NMS."""
    from samkit.everything import MaskGenerator
    from samkit.models.sam import Sam

    sam = getattr(predictor, "model", None)
    # Only a samkit Sam goes to MaskGenerator; other predictors (GrabCut, the reference) get grid prompts.
    if isinstance(sam, Sam):
        kwargs: dict[str, Any] = {} if points_per_side is None else {"points_per_side": points_per_side}
        if pred_iou_thresh is not None:
            kwargs["pred_iou_thresh"] = pred_iou_thresh
        generator = MaskGenerator(sam, prompts=prompts, prompt_head=prompt_head, peaks=peaks, **kwargs)

        def propose(item: ImageItem) -> tuple[list[np.ndarray], np.ndarray]:
            image = load_image(item.image)
            if isinstance(predictor, CachedPredictor):
                # Models that share an encoder (and reruns) take the embedding from the cache.
                predictor.set_image(image)
                records = generator.generate(image, embedded=predictor)
            else:
                records = generator.generate(image)
            masks = [np.asarray(r["segmentation"], dtype=bool) for r in records]
            return masks, np.array([r["predicted_iou"] for r in records], dtype=np.float64)

        return propose
    if prompts != "grid":
        raise ProtocolError(f"--prompts {prompts} needs a samkit SAM model (it runs MaskGenerator)")

    def propose_grid(item: ImageItem) -> tuple[list[np.ndarray], np.ndarray]:
        image = load_image(item.image)
        predictor.set_image(image)
        keep, scores, masks, _ = P.grid_masks(predictor, *image.shape[:2], points_per_side or 8)
        return [masks[i] for i in keep], scores[keep]

    return propose_grid


def run_eval(
    protocol: str,
    data: str | Path | Dataset,
    model: Any = None,
    limit: int | None = None,
    out: str | Path | None = None,
    *,
    max_clicks: int = 20,
    points_per_side: int | None = None,
    thresholds: int = 99,
    progress: bool = True,
    embedding_cache: str | Path | None = None,
    pred_iou_thresh: float | None = None,
    prompts: str = "grid",
    prompt_head: str | Path | None = None,
    peaks: str = "",
) -> dict[str, Any]:
    """Run `protocol` on the first `limit` items of `data` with `model`; return (and write) the report.

    protocol: one of single-point, clicks, box, edges, proposals. data: a path `open_dataset` understands
    or a Dataset. model: see `resolve_model`. out: JSON path (written atomically); the clicks protocol
    also writes its mIoU-vs-clicks curve next to it as `<out stem>.png`. points_per_side: grid of the
    edges protocol (default 16, the paper's) and of proposals (MaskGenerator's default, 32, for samkit
    models; 8 for the grid prompts other models get). thresholds: edge thresholds (99 as in BSDS; fewer
    is faster and approximate). embedding_cache: a folder where image embeddings are kept between runs,
    per encoder fingerprint, so models sharing an image encoder (a decoder-only fine-tune and its base)
    encode each image once; samkit models only. pred_iou_thresh: proposals only, MaskGenerator's
    predicted-IoU filter (default 0.88); a fine-tuned IoU head may score every mask below it, and 0
    keeps the ranking but drops the filter. prompts: proposals only, MaskGenerator's prompt source
    ("grid" or "learned"); prompt_head: with "learned", a head file trained for `model` (default: the one
    shipped for vit_t); peaks: with "learned", `PeakSettings` fields as "KEY=VALUE,..." (`parse_peaks`).
    Returns {"meta", "summary", "items"}.
    """
    if protocol not in PROTOCOLS:
        raise ProtocolError(f"unknown protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    if thresholds < 1:
        raise ProtocolError(f"--thresholds must be at least 1, got {thresholds}")
    if limit is not None and limit < 1:
        raise ProtocolError(f"--limit must be a positive number of items, got {limit}")
    if protocol == "edges":
        require("eval", "the edges protocol")
    elif protocol == "clicks" and out is not None:
        require("eval", "the clicks protocol's curve plot")
    dataset = data if isinstance(data, Dataset) else open_dataset(data)
    predictor, meta = resolve_model(model, embedding_cache)

    if protocol == "edges":
        items = dataset.edges()
    elif protocol == "proposals":
        items = dataset.images()
    else:
        items = dataset.objects()
    total = len(dataset) if protocol in ("edges", "proposals") or dataset.kind == "mask-folder" else None
    if limit is not None:
        total = limit if total is None else min(total, limit)

    results: list[dict[str, Any]] = []
    counts = []
    if prompt_head is not None and (protocol != "proposals" or prompts != "learned"):
        raise ProtocolError("--prompt-head is for the proposals protocol with --prompts learned")
    if peaks and (protocol != "proposals" or prompts != "learned"):
        raise ProtocolError("--peaks is for the proposals protocol with --prompts learned")
    propose = (
        _proposer(predictor, points_per_side, pred_iou_thresh, prompts, prompt_head, peaks)
        if protocol == "proposals"
        else None
    )
    current_image = None
    skipped: list[str] = []
    bar = tqdm(total=total, desc=f"{protocol} {meta['model']}", unit="item", disable=not progress)
    for item in items:
        if limit is not None and len(results) >= limit:
            break
        if protocol in ("single-point", "clicks", "box") and not _has_valid_pixels(item):
            # An object entirely inside an ignore region (e.g. under a COCO crowd) cannot be prompted.
            skipped.append(item.id)
            continue
        if protocol == "proposals":
            result = P.proposals(propose, item)
        else:
            if item.image != current_image:
                image = load_image(item.image)
                predictor.set_image(image)
                current_image = item.image
            if protocol == "single-point":
                result = P.single_point(predictor, item)
            elif protocol == "clicks":
                result = P.clicks(predictor, item, max_clicks)
            elif protocol == "box":
                result = P.box(predictor, item)
            else:
                result, c = P.edges(predictor, item, *image.shape[:2], points_per_side or 16, thresholds)
                counts.append(c)
        results.append({"id": item.id, **result})
        bar.update(1)
    bar.close()

    if protocol == "single-point":
        summary = P.summarize_single_point(results)
    elif protocol == "clicks":
        summary = P.summarize_clicks(results, max_clicks)
    elif protocol == "box":
        summary = P.summarize_box(results)
    elif protocol == "edges":
        summary = P.summarize_edges(counts)
    else:
        summary = P.summarize_proposals(results)
    summary["n_items"] = len(results)
    if skipped:
        summary["n_skipped"] = len(skipped)

    settings: dict[str, Any] = {"limit": limit}
    if protocol == "clicks":
        settings.update(
            max_clicks=max_clicks, first_click="3-mask output, top score", later_clicks="single mask"
        )
    if protocol in ("edges", "proposals"):
        settings["points_per_side"] = points_per_side
    if protocol == "proposals":
        settings["pred_iou_thresh"] = pred_iou_thresh
        settings["prompts"] = prompts
        if prompt_head is not None:
            settings["prompt_head"] = str(prompt_head)
        if peaks:
            settings["peaks"] = peaks
    if protocol == "edges":
        settings["thresholds"] = thresholds
    if isinstance(predictor, CachedPredictor):
        settings["embedding_cache"] = {
            "dir": str(predictor.root),
            "hits": predictor.hits,
            "misses": predictor.misses,
        }
    report = {
        "meta": {
            "protocol": protocol,
            **meta,
            "dataset": str(dataset.root),
            "dataset_kind": dataset.kind,
            "settings": settings,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(),
        },
        "summary": summary,
        "items": results,
    }
    if out is not None:
        _write_json(Path(out), report)
        if protocol == "clicks" and summary["mIoU_curve"]:
            P.plot_click_curve(
                summary["mIoU_curve"],
                str(Path(out).with_suffix(".png")),
                f"{meta['model']} on {dataset.root.name}",
            )
    return report


def _has_valid_pixels(item: ObjectItem) -> bool:
    return bool(item.mask.any() if item.ignore is None else (item.mask & ~item.ignore).any())


def _write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(report, f, indent=1, default=_jsonable)
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def format_table(report: dict[str, Any]) -> str:
    """The summary as a two-column text table (the curve is left to the JSON and the PNG)."""
    meta = report["meta"]
    rows = [(k, v) for k, v in report["summary"].items() if not isinstance(v, list)]
    width = max(len(k) for k, _ in rows)
    lines = [f"{meta['protocol']} | model {meta['model']} | {meta['dataset']}", "-" * (width + 12)]
    for k, v in rows:
        text = f"{v:.4f}" if isinstance(v, float) else str(v)
        lines.append(f"{k:<{width}}  {text:>9}")
    return "\n".join(lines)
