"""The web app: a JSON API over `Project` and the static front end (plain HTML/JS/CSS, no build step).

Errors are `samkit.web`'s, as in every samkit web app: `{"error": "<one line>"}` with the status of
`samkit.web.STATUS_OF_ERROR` (unknown ids and paths outside the images folder 404, missing image files
410, bad prompts 400, an image still embedding 503, bodies over `MAX_JSON_BYTES` 413). Prompts are
`samkit.web_schema.PromptFields`, shared with `samkit serve`; so is access (token, Host check).
"""

from __future__ import annotations

import io
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import FastAPI, Query
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from samkit.annotate.project import Project, Prompt
from samkit.errors import NotFoundError
from samkit.web import (
    MAX_JSON_BYTES,
    TOKEN_QUERY,
    UVICORN_CONNECTIONS,
    Access,
    BodyLimit,
    Guard,
    install_error_handlers,
    warn_if_open,
)
from samkit.web_schema import PromptFields

# Formats browsers display as they are; others (TIFF) are sent as PNG.
_BROWSER_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


# Annotator names are stored with every event.
_Name = Field(default="", max_length=200)
_NameQuery = Annotated[str, Query(max_length=200)]


class AcceptBody(PromptFields):
    candidate: int = 0
    label: str = "object"
    annotator: str = _Name
    duration_ms: float | None = None


class LabelBody(BaseModel):
    label: str
    annotator: str = _Name


class StatusBody(BaseModel):
    status: str
    annotator: str = _Name


class AutoBody(BaseModel):
    points_per_side: int = 16
    prompts: Literal["grid", "learned"] = "grid"
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    label: str = "object"
    annotator: str = _Name


class EventBody(BaseModel):
    kind: str = Field(min_length=1, max_length=40)
    image_id: int | None = None
    annotator: str = _Name
    duration_ms: float | None = None
    detail: dict[str, Any] | None = None


def create_app(project: Project, access: Access | None = None) -> FastAPI:
    """The FastAPI app serving `project`; `project.start()` is called when the server starts.

    access: token and Host names (None: every request is answered; `serve` sets it from the address it
    listens on).
    """

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        project.start()
        yield
        project.embeddings.stop()

    app = FastAPI(
        title="samkit annotate", docs_url="/api/docs", openapi_url="/api/openapi.json", lifespan=lifespan
    )
    static = Path(str(resources.files("samkit.annotate") / "static"))
    app.add_middleware(BodyLimit, max_bytes=MAX_JSON_BYTES)
    app.add_middleware(Guard, access=access or Access())
    install_error_handlers(app)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(static / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=static), name="static")

    @app.get("/api/project")
    def project_info() -> dict[str, Any]:
        return {
            "images_dir": str(project.root),
            "db": str(project.store.path),
            "model": project.model_name or "default",
            "progress": project.embeddings.progress(),
            "stats": project.store.stats(),
        }

    @app.get("/api/progress")
    def progress() -> dict[str, Any]:
        return project.embeddings.progress()

    @app.get("/api/images")
    def images() -> list[dict[str, Any]]:
        return project.images()

    @app.get("/api/images/{image_id}")
    def image(image_id: int) -> dict[str, Any]:
        im = project.image(image_id)
        missing = not (project.root / im["path"]).is_file()
        objects = [o.as_json() for o in project.store.objects(image_id)]
        return {
            **im,
            "missing": missing,
            "embedded": project.embeddings.is_ready(image_id),
            "objects": objects,
        }

    @app.get("/api/images/{image_id}/file")
    def image_file(image_id: int) -> Response:
        return _send_image(project.image_file(image_id))

    @app.get("/files/{rel:path}")
    def file_by_path(rel: str) -> Response:
        return _send_image(project.resolve(rel))

    @app.post("/api/images/{image_id}/open")
    def open_image(image_id: int, annotator: _NameQuery = "") -> dict[str, Any]:
        project.open_image(image_id, annotator)
        return {"ok": True, "embedded": project.embeddings.is_ready(image_id)}

    @app.post("/api/images/{image_id}/predict")
    def predict(image_id: int, body: PromptFields) -> dict[str, Any]:
        started = time.perf_counter()
        prompt = Prompt(*body.predict_args())
        cands = project.predict(image_id, prompt, body.multimask)
        return {
            "candidates": [
                {
                    "rle": c.rle,
                    "bbox": c.bbox,
                    "area": c.area,
                    "score": c.score,
                    "stability_score": c.stability_score,
                }
                for c in cands
            ],
            "server_ms": (time.perf_counter() - started) * 1000.0,
        }

    @app.post("/api/images/{image_id}/objects")
    def accept(image_id: int, body: AcceptBody) -> dict[str, Any]:
        prompt = Prompt(*body.predict_args())
        obj = project.accept(
            image_id, prompt, body.candidate, body.label, body.annotator, body.duration_ms, body.multimask
        )
        return obj.as_json()

    @app.patch("/api/objects/{object_id}")
    def relabel(object_id: int, body: LabelBody) -> dict[str, Any]:
        if project.store.object(object_id) is None:
            raise NotFoundError(f"no object with id {object_id}")
        return project.store.relabel_object(object_id, body.label, body.annotator).as_json()

    @app.delete("/api/objects/{object_id}")
    def delete(object_id: int, annotator: _NameQuery = "") -> dict[str, Any]:
        if project.store.object(object_id) is None:
            raise NotFoundError(f"no object with id {object_id} (deleted already?)")
        return project.store.delete_object(object_id, annotator).as_json()

    @app.post("/api/images/{image_id}/status")
    def set_status(image_id: int, body: StatusBody) -> dict[str, Any]:
        project.image(image_id)
        project.store.set_status(image_id, body.status, body.annotator)
        return {"ok": True, "status": body.status}

    @app.post("/api/images/{image_id}/auto")
    def auto(image_id: int, body: AutoBody) -> dict[str, Any]:
        started = time.perf_counter()
        objs = project.auto(
            image_id,
            body.points_per_side,
            body.pred_iou_thresh,
            body.stability_score_thresh,
            body.label,
            body.annotator,
            body.prompts,
        )
        return {"objects": [o.as_json() for o in objs], "seconds": time.perf_counter() - started}

    @app.post("/api/events")
    def event(body: EventBody) -> dict[str, Any]:
        if body.image_id is not None:
            project.image(body.image_id)
        project.store.log_event(body.kind, body.image_id, None, body.annotator, body.duration_ms, body.detail)
        return {"ok": True}

    return app


def _send_image(path: Path) -> Response:
    if path.suffix.lower() in _BROWSER_SUFFIXES:
        return FileResponse(path)
    from PIL import Image

    from samkit.image import load_image

    buf = io.BytesIO()
    Image.fromarray(load_image(path)).save(buf, format="PNG")
    return Response(buf.getvalue(), media_type="image/png")


def serve(
    project: Project,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    allow_hosts: Sequence[str] = (),
) -> None:
    """Run the app with uvicorn until interrupted, printing its URL first (with `?token=` when a token
    is set: opening it once gives the browser the token as a cookie).

    Access: `token` (or $SAMKIT_TOKEN) if set; Host names from `Access.for_bind(host, token, allow_hosts)`.
    """
    import uvicorn

    access = Access.for_bind(host, token, allow_hosts)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}/"
    if access.token:
        url += f"?{TOKEN_QUERY}={quote(access.token)}"
    n = len(project.store.images())
    print(f"samkit annotate: {url}  ({n} images, database {project.store.path})", flush=True)
    warn_if_open(host, access)
    app = create_app(project, access)
    uvicorn.run(app, host=host, port=port, log_level="warning", limit_concurrency=UVICORN_CONNECTIONS)
