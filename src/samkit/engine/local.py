"""Segment everything over many images on this machine: resumable, one SA-1B JSON per image.

Each image's JSON is written atomically, so a JSON that exists is complete; a rerun skips those
images (resume after Ctrl-C or a crash) unless `overwrite` is set. `manifest.jsonl` in the output
folder logs one line per image processed or failed. Unreadable images are reported and skipped; an
output that cannot be written (read-only or full disk) stops the run with an OutputError. One run at a
time holds the output folder (a lock file in it); a second run into the same folder is refused.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from samkit.errors import InputError, OutputError
from samkit.everything import MaskGenerator
from samkit.formats import read_sa1b, save_overlay, write_coco, write_sa1b
from samkit.image import load_image

MANIFEST = "manifest.jsonl"
LOCK = ".samkit.lock"
Status = Literal["done", "skipped", "failed"]


@dataclass
class ImageResult:
    """What happened to one image: status, masks written, seconds spent, and why it failed."""

    path: Path
    json_path: Path
    status: Status
    n_masks: int = 0
    seconds: float = 0.0
    reason: str = ""


@dataclass
class RunSummary:
    """Results of a run, one per input image, in input order."""

    results: list[ImageResult] = field(default_factory=list)

    def count(self, status: Status) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> list[ImageResult]:
        return [r for r in self.results if r.status == "failed"]

    def text(self) -> str:
        """A few human-readable lines: counts, then one line per failed image."""
        lines = [
            f"done {self.count('done')}, skipped {self.count('skipped')} (already done), "
            f"failed {self.count('failed')}"
        ]
        lines += [f"  failed: {r.path}: {r.reason}" for r in self.failed]
        return "\n".join(lines)


def output_paths(images: Sequence[Path]) -> list[Path]:
    """Relative JSON path for each image, mirroring its path under the images' common folder.

    `sub/a.jpg` -> `sub/a.json`; when two images would share a JSON (`a.jpg` and `a.png` side by side)
    both keep their suffix instead (`a.jpg.json`, `a.png.json`).
    """
    if not images:
        return []
    resolved = [Path(os.path.abspath(p)) for p in images]
    root = Path(os.path.commonpath([p.parent for p in resolved]))
    rel = [p.relative_to(root) for p in resolved]
    plain = [r.with_suffix(".json") for r in rel]
    seen: dict[Path, int] = {}
    for p in plain:
        seen[p] = seen.get(p, 0) + 1
    return [p if seen[p] == 1 else r.with_name(r.name + ".json") for p, r in zip(plain, rel, strict=True)]


def process_image(
    path: Path,
    generator: MaskGenerator,
    out_dir: Path,
    json_rel: Path,
    image_id: int,
    overlay: bool = False,
    progress: bool = False,
) -> ImageResult:
    """Segment everything in one image and write `out_dir / json_rel` (SA-1B), plus an overlay picture
    next to it (`<name>.overlay.jpg`) when asked; `progress` shows a bar over the image's prompt batches.
    Never raises for a bad image: returns status "failed" with the reason instead. The engine for many
    machines calls this once per image. Raises OutputError when the outputs cannot be written (a
    read-only or full disk: every later image would fail the same way); nothing of the image is left."""
    target = out_dir / json_rel
    overlay_path = target.with_name(target.stem + ".overlay.jpg")
    start = time.perf_counter()
    try:
        image = load_image(path)
        records = generator.generate(image, progress=progress)
        h, w = image.shape[:2]
        info = {"image_id": image_id, "width": w, "height": h, "file_name": Path(path).name}
        if overlay:
            save_overlay(overlay_path, image, records)
        # The JSON last: its existence is what marks the image done.
        write_sa1b(target, info, records)
    except (KeyboardInterrupt, SystemExit):
        raise
    except OSError as exc:  # image reading raises ImageError, so this is the output side
        if overlay:
            overlay_path.unlink(missing_ok=True)
        raise OutputError(f"cannot write the results of {path}: {exc}") from None
    except Exception as exc:  # one bad image must not end a run over thousands
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return ImageResult(Path(path), target, "failed", seconds=time.perf_counter() - start, reason=reason)
    return ImageResult(Path(path), target, "done", len(records), time.perf_counter() - start)


def run_local(
    images: Sequence[Path],
    generator: MaskGenerator,
    out_dir: str | Path,
    overwrite: bool = False,
    overlay: bool = False,
    coco: str | Path | None = None,
    progress: bool = True,
    on_result: Callable[[ImageResult], None] | None = None,
) -> RunSummary:
    """Run `process_image` over `images`, skipping those whose JSON exists unless `overwrite`.

    Appends a line per processed or failed image to `out_dir/manifest.jsonl`. With `coco`, also writes
    a COCO instances file of every image that has a JSON (from this run or an earlier one). Raises
    OutputError when another run holds `out_dir` (see `hold_output`) or the outputs cannot be written.
    """
    out = Path(out_dir)
    rels = output_paths(images)
    summary = RunSummary()
    inner_bars = progress and sys.stderr.isatty()  # a bar per image only where it redraws in place
    with hold_output(out, overwrite) as manifest:
        bar = _progress(len(images), progress)
        try:
            for i, (path, rel) in enumerate(zip(images, rels, strict=True)):
                result = manifest.skipped(path, rel)
                if result is None:
                    result = process_image(Path(path), generator, out, rel, i, overlay, inner_bars)
                    manifest.record(path, rel, result)
                summary.results.append(result)
                if on_result is not None:
                    on_result(result)
                bar.update(1)
        finally:
            bar.close()
    if coco is not None:
        write_coco_for(Path(coco), images, [out / r for r in rels])
    return summary


def write_coco_for(path: Path, images: Sequence[Path], json_paths: Sequence[Path]) -> Path:
    """One COCO instances file from the SA-1B JSONs of a run (images without a JSON are left out)."""
    infos, anns = [], []
    for i, (image, jp) in enumerate(zip(images, json_paths, strict=True)):
        if not jp.exists():
            continue
        data = read_sa1b(jp)
        meta = data["image"]
        infos.append({"id": i, "file_name": str(image), "width": meta["width"], "height": meta["height"]})
        anns.append(data["annotations"])
    if not infos:
        raise InputError("no image was segmented, so there is nothing to write to the COCO file")
    return write_coco(path, infos, anns)


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Entries of a manifest.jsonl; a last line cut short by a crash is ignored."""
    entries = []
    p = Path(path)
    if not p.exists():
        return entries
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


class Manifest:
    """The resume rule and the manifest lines of a run, one implementation for the local and the Ray
    engine. `hold_output` makes it; `out` is the output folder, `path` its manifest.jsonl."""

    def __init__(self, out: Path, overwrite: bool) -> None:
        self.out = out
        self.path = out / MANIFEST
        self.overwrite = overwrite
        entries = read_manifest(self.path)
        self.logged = {e["json"] for e in entries if e.get("status") == "done" and "json" in e}

    def skipped(self, image: str | Path, rel: Path) -> ImageResult | None:
        """The "skipped" result of an image whose JSON an earlier run wrote (unless `overwrite`); None:
        the image is to be processed. A JSON the manifest misses (a run killed between writing the JSON
        and logging it) is logged now as recovered, and not redone."""
        target = self.out / rel
        if self.overwrite or not target.exists():
            return None
        if str(rel) not in self.logged:
            append_entry(
                self.path, {"image": str(image), "json": str(rel), "status": "done", "recovered": True}
            )
        return ImageResult(Path(image), target, "skipped")

    def record(self, image: str | Path, rel: Path, result: ImageResult, **extra: Any) -> None:
        """Log a processed or failed image: masks and seconds, or the reason, then `extra`."""
        entry: dict[str, Any] = {"image": str(image), "json": str(rel), "status": result.status}
        if result.status == "done":
            entry.update(masks=result.n_masks, seconds=round(result.seconds, 3))
        else:
            entry["reason"] = result.reason
        append_entry(self.path, {**entry, **extra})


def append_entry(manifest: Path, entry: dict[str, Any]) -> None:
    """Append one manifest line. On a full or read-only disk the manifest is left as it was and
    OutputError is raised."""
    line = (json.dumps(entry) + "\n").encode("utf-8")
    try:
        f = open(manifest, "ab")
    except OSError as exc:
        raise OutputError(f"cannot write {manifest}: {exc}") from None
    with f:
        before = f.tell()
        try:
            # One write per line, flushed to disk, so a crash loses at most the line being written.
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        except OSError as exc:
            _undo_append(f, before)
            raise OutputError(f"cannot write {manifest}: {exc}") from None


def _undo_append(f: Any, size: int) -> None:
    """Truncate a file back to `size` bytes after a failed append; a file that was new is removed."""
    try:
        f.truncate(size)
        if size == 0:
            os.unlink(f.name)
    except OSError:
        pass  # then the next run's repair_manifest cuts the partial line


@contextmanager
def hold_output(out: Path, overwrite: bool = False) -> Iterator[Manifest]:
    """Hold the output folder `out` for one run (shared by the local and the Ray engine): create it,
    take its lock (OutputError when another run holds it) and repair a manifest whose last line a
    killed run cut short. Yields the run's `Manifest` (`overwrite`: redo images already done). The lock is released when the block ends, and by
    the system when the process dies (kill -9 included), so a stale lock file never blocks a rerun."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / LOCK, "ab")
    except OSError as exc:
        raise OutputError(f"cannot write to the output folder {out}: {exc}") from None
    with lock:
        if not _try_lock(lock):
            raise OutputError(
                f"another samkit run is writing to {out} (it holds {out / LOCK}); wait for it to finish "
                "or give another --out"
            )
        repair_manifest(out / MANIFEST)
        yield Manifest(out, overwrite)


def _try_lock(f: Any) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows has no flock: two runs into one folder are not detected there
        return True
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def repair_manifest(path: Path) -> None:
    """Cut off a last line that has no newline (a run killed while appending it), so the next entry
    starts on a line of its own. Nothing is lost: the cut image's JSON, if it was written, is logged
    again as recovered; an image without a JSON is redone."""
    try:
        with open(path, "r+b") as f:
            end = keep = f.seek(0, os.SEEK_END)
            while keep > 0:
                start = max(0, keep - 65536)
                f.seek(start)
                chunk = f.read(keep - start)
                if keep == end and chunk.endswith(b"\n"):
                    return
                cut = chunk.rfind(b"\n")
                if cut >= 0:
                    keep = start + cut + 1
                    break
                keep = start
            f.truncate(keep)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OutputError(f"cannot repair {path}: {exc}") from None


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    # rate_noinv: always images per second, also when an image takes longer than a second.
    fmt = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]"
    return tqdm(total=total, unit="img", desc="everything", dynamic_ncols=True, bar_format=fmt)
