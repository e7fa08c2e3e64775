"""The annotation project: one SQLite file (WAL mode) with images, objects and an event log.

Every write is its own committed transaction, so killing the server loses nothing that was accepted, and
several processes or browser tabs can write to the same file (SQLite serialises the writers). Masks are
stored as COCO RLE (column-major, compressed counts string); bboxes as XYWH, as COCO and SA-1B want them.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samkit.errors import InputError

SOURCES = ("manual", "auto", "import")
STATUSES = ("todo", "in progress", "done")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,            -- relative to the images root, '/' separated
    width INTEGER, height INTEGER,
    status TEXT NOT NULL DEFAULT 'todo',  -- todo | in progress | done
    position INTEGER NOT NULL DEFAULT 0,  -- order of the listing (embedding order)
    added_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS objects (
    id INTEGER PRIMARY KEY,
    image_id INTEGER NOT NULL REFERENCES images(id),
    rle TEXT NOT NULL,                    -- COCO RLE JSON {"size": [h, w], "counts": str}
    bbox TEXT NOT NULL,                   -- JSON [x, y, w, h]
    area INTEGER NOT NULL,
    label TEXT NOT NULL DEFAULT 'object',
    predicted_iou REAL,
    stability_score REAL,
    prompt TEXT,                          -- JSON {"points": [[x, y, label]], "box": [x0, y0, x1, y1]}
    source TEXT NOT NULL,                 -- manual | auto | import
    annotator TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    deleted_at REAL                       -- soft delete: the event log keeps pointing at the row
);
CREATE INDEX IF NOT EXISTS objects_image ON objects(image_id) WHERE deleted_at IS NULL;
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    image_id INTEGER,
    object_id INTEGER,
    kind TEXT NOT NULL,                   -- accept, discard, undo, delete, relabel, auto, status, import, ...
    annotator TEXT NOT NULL DEFAULT '',
    duration_ms REAL,                     -- for accept: first prompt to accept (time per mask)
    detail TEXT,                          -- JSON
    created_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class ObjectRecord:
    """One accepted mask. rle: COCO RLE of the (H, W) mask; bbox: XYWH original-image pixels."""

    id: int
    image_id: int
    rle: dict[str, Any]
    bbox: list[float]
    area: int
    label: str
    predicted_iou: float | None
    stability_score: float | None
    prompt: dict[str, Any] | None
    source: str
    annotator: str
    created_at: float

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Store:
    """Thread-safe access to one project file: a connection per thread, each write committed at once."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise InputError(f"--db {self.path} is a folder; give a file name such as project.sqlite")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        try:
            self._conn().executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise InputError(f"{self.path} is not a samkit annotation database ({exc})") from None

    # --- connections -----------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a killed process (only a power cut can lose the last commits).
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes the write lock up front so writers never deadlock."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # --- meta ------------------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self._conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row["value"])

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # --- images ----------------------------------------------------------------------------------------

    def sync_images(self, entries: Sequence[tuple[str, int | None, int | None]]) -> None:
        """Add images not yet known, as (relative path, width, height), and set the listing order.

        Images already in the project keep their objects and status, also when their file is gone.
        """
        now = time.time()
        with self._tx() as db:
            # Images no longer listed (missing files) go after the listed ones, in their old order.
            db.execute("UPDATE images SET position = position + 1000000000")
            for pos, (rel, w, h) in enumerate(entries):
                db.execute(
                    "INSERT INTO images (path, width, height, position, added_at) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT(path) DO UPDATE SET position = excluded.position, "
                    "width = COALESCE(excluded.width, images.width), "
                    "height = COALESCE(excluded.height, images.height)",
                    (rel, w, h, pos, now),
                )

    def images(self) -> list[dict[str, Any]]:
        """Every image with its status and number of objects, in listing order."""
        rows = self._conn().execute(
            "SELECT i.id, i.path, i.width, i.height, i.status, "
            "(SELECT COUNT(*) FROM objects o WHERE o.image_id = i.id AND o.deleted_at IS NULL) AS objects "
            "FROM images i ORDER BY i.position, i.id"
        )
        return [dict(r) for r in rows]

    def image(self, image_id: int) -> dict[str, Any] | None:
        if not _is_row_id(image_id):
            return None
        row = self._conn().execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()
        return None if row is None else dict(row)

    def image_by_path(self, rel: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT * FROM images WHERE path = ?", (rel,)).fetchone()
        return None if row is None else dict(row)

    def set_status(self, image_id: int, status: str, annotator: str = "") -> None:
        if status not in STATUSES:
            raise InputError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        with self._tx() as db:
            db.execute("UPDATE images SET status = ? WHERE id = ?", (status, image_id))
            _event(db, "status", image_id, None, annotator, None, {"status": status})

    # --- objects ---------------------------------------------------------------------------------------

    def add_object(
        self,
        image_id: int,
        rle: dict[str, Any],
        bbox: Sequence[float],
        area: int,
        *,
        label: str = "object",
        predicted_iou: float | None = None,
        stability_score: float | None = None,
        prompt: dict[str, Any] | None = None,
        source: str = "manual",
        annotator: str = "",
        duration_ms: float | None = None,
    ) -> ObjectRecord:
        """Insert one object and its 'accept' event in one committed transaction.

        An image still 'todo' becomes 'in progress'. rle: COCO RLE; bbox: XYWH original-image pixels.
        """
        return self.add_objects(
            image_id,
            [
                {
                    "rle": rle,
                    "bbox": bbox,
                    "area": area,
                    "label": label,
                    "predicted_iou": predicted_iou,
                    "stability_score": stability_score,
                    "prompt": prompt,
                }
            ],
            source=source,
            annotator=annotator,
            duration_ms=duration_ms,
        )[0]

    def add_objects(
        self,
        image_id: int,
        items: Sequence[dict[str, Any]],
        *,
        source: str,
        annotator: str = "",
        duration_ms: float | None = None,
        replace_source: bool = False,
    ) -> list[ObjectRecord]:
        """Insert several objects at once (auto mode, import). With replace_source, live objects of the
        same source on this image are deleted first, in the same transaction."""
        if source not in SOURCES:
            raise InputError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
        now = time.time()
        ids = []
        with self._tx() as db:
            if db.execute("SELECT 1 FROM images WHERE id = ?", (image_id,)).fetchone() is None:
                raise InputError(f"no image with id {image_id} in this project")
            if replace_source:
                db.execute(
                    "UPDATE objects SET deleted_at = ? WHERE image_id = ? AND source = ? AND deleted_at IS NULL",
                    (now, image_id, source),
                )
            for item in items:
                cur = db.execute(
                    "INSERT INTO objects (image_id, rle, bbox, area, label, predicted_iou, stability_score, "
                    "prompt, source, annotator, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        image_id,
                        json.dumps(item["rle"]),
                        json.dumps([float(v) for v in item["bbox"]]),
                        int(item["area"]),
                        str(item.get("label") or "object"),
                        _opt_float(item.get("predicted_iou")),
                        _opt_float(item.get("stability_score")),
                        None if item.get("prompt") is None else json.dumps(item["prompt"]),
                        source,
                        annotator,
                        now,
                    ),
                )
                ids.append(int(cur.lastrowid or 0))
            kind = "accept" if source == "manual" else source
            detail = {"count": len(ids)} if len(ids) != 1 else None
            _event(db, kind, image_id, ids[0] if len(ids) == 1 else None, annotator, duration_ms, detail)
            if ids:
                db.execute(
                    "UPDATE images SET status = 'in progress' WHERE id = ? AND status = 'todo'", (image_id,)
                )
        return [self.object(i) for i in ids]  # type: ignore[misc]

    def object(self, object_id: int) -> ObjectRecord | None:
        if not _is_row_id(object_id):
            return None
        row = _live_object(self._conn(), object_id)
        return None if row is None else _record(row)

    def objects(self, image_id: int) -> list[ObjectRecord]:
        """Live objects of one image, oldest first."""
        rows = self._conn().execute(
            "SELECT * FROM objects WHERE image_id = ? AND deleted_at IS NULL ORDER BY id", (image_id,)
        )
        return [_record(r) for r in rows]

    def delete_object(self, object_id: int, annotator: str = "") -> ObjectRecord:
        with self._tx() as db:
            row = _existing_object(db, object_id)
            db.execute("UPDATE objects SET deleted_at = ? WHERE id = ?", (time.time(), object_id))
            _event(db, "delete", row["image_id"], object_id, annotator, None, None)
        return _record(row)

    def relabel_object(self, object_id: int, label: str, annotator: str = "") -> ObjectRecord:
        label = label.strip()
        if not label or len(label) > 200:
            raise InputError("a label must be 1 to 200 characters")
        with self._tx() as db:
            row = _existing_object(db, object_id)
            db.execute("UPDATE objects SET label = ? WHERE id = ?", (label, object_id))
            _event(
                db,
                "relabel",
                row["image_id"],
                object_id,
                annotator,
                None,
                {"from": row["label"], "to": label},
            )
        return self.object(object_id)  # type: ignore[return-value]

    # --- events ----------------------------------------------------------------------------------------

    def log_event(
        self,
        kind: str,
        image_id: int | None = None,
        object_id: int | None = None,
        annotator: str = "",
        duration_ms: float | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        with self._tx() as db:
            _event(db, kind, image_id, object_id, annotator, duration_ms, detail)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM events" + (" WHERE kind = ?" if kind else "") + " ORDER BY id"
        rows = self._conn().execute(sql, (kind,) if kind else ())
        return [dict(r) for r in rows]

    def stats(self) -> dict[str, Any]:
        """Counts and the median time per accepted manual mask (ms), the figure the SAM paper reports."""
        conn = self._conn()
        durations = sorted(
            r[0]
            for r in conn.execute(
                "SELECT duration_ms FROM events WHERE kind = 'accept' AND duration_ms IS NOT NULL"
            )
        )
        objects = conn.execute("SELECT COUNT(*) FROM objects WHERE deleted_at IS NULL").fetchone()[0]
        return {
            "objects": int(objects),
            "accepted_manual": len(durations),
            "median_ms_per_mask": durations[len(durations) // 2] if durations else None,
        }


def _event(
    db: sqlite3.Connection,
    kind: str,
    image_id: int | None,
    object_id: int | None,
    annotator: str,
    duration_ms: float | None,
    detail: dict[str, Any] | None,
) -> None:
    db.execute(
        "INSERT INTO events (image_id, object_id, kind, annotator, duration_ms, detail, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            image_id,
            object_id,
            kind,
            annotator,
            _opt_float(duration_ms),
            None if detail is None else json.dumps(detail),
            time.time(),
        ),
    )


def _is_row_id(value: int) -> bool:
    """An id SQLite can hold (64-bit); a larger one from a URL is simply not found."""
    return -(2**63) <= value < 2**63


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _live_object(db: sqlite3.Connection, object_id: int) -> sqlite3.Row | None:
    """The row of an object that is not deleted, or None."""
    return db.execute("SELECT * FROM objects WHERE id = ? AND deleted_at IS NULL", (object_id,)).fetchone()


def _existing_object(db: sqlite3.Connection, object_id: int) -> sqlite3.Row:
    """The row of an object that is not deleted; InputError for an unknown or deleted id."""
    row = _live_object(db, object_id)
    if row is None:
        raise InputError(f"no object with id {object_id} (deleted already?)")
    return row


def _record(row: sqlite3.Row) -> ObjectRecord:
    return ObjectRecord(
        id=int(row["id"]),
        image_id=int(row["image_id"]),
        rle=json.loads(row["rle"]),
        bbox=json.loads(row["bbox"]),
        area=int(row["area"]),
        label=str(row["label"]),
        predicted_iou=row["predicted_iou"],
        stability_score=row["stability_score"],
        prompt=None if row["prompt"] is None else json.loads(row["prompt"]),
        source=str(row["source"]),
        annotator=str(row["annotator"]),
        created_at=float(row["created_at"]),
    )
