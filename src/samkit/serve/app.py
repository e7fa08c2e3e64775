"""`samkit serve`: a FastAPI service that embeds an image once and answers prompts on it.

Endpoints: POST /embed (image upload -> embedding id), POST /predict (embedding id + prompts -> COCO RLE
masks and scores), GET /embeddings/{id} (the raw embedding, for clients that decode locally),
POST /everything (image -> SA-1B JSON), GET /models, GET /health; OpenAPI docs at /docs.
Coordinates: points (x, y) and boxes XYXY in original-image pixels.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from samkit.errors import CheckpointError, ImageError, InputError, SamkitError, StateError
from samkit.serve.cache import EmbeddingCache

CONFIG_ENV = "SAMKIT_SERVE_CONFIG"


@dataclass
class ServeConfig:
    """What the service loads and how much it accepts.

    model: zoo name or checkpoint path (None: the default model). cache_dir: where embeddings are kept
    (default: $SAMKIT_HOME/serve/<model>). max_embeddings: LRU bound of that cache. max_upload_mb: request
    body limit (413 beyond). max_image_pixels: decoded image limit (400 beyond).
    """

    model: str | None = None
    cache_dir: str | None = None
    max_embeddings: int = 256
    max_upload_mb: float = 32.0
    max_image_pixels: int = 64_000_000


class PredictBody(BaseModel):
    embedding_id: str = Field(description="id returned by POST /embed")
    points: list[tuple[float, float]] | None = Field(
        None, description="[[x, y], ...] in original-image pixels"
    )
    labels: list[int] | None = Field(None, description="one per point: 1 foreground, 0 background")
    box: tuple[float, float, float, float] | None = Field(
        None, description="[x0, y0, x1, y1] (XYXY) in original-image pixels"
    )
    multimask: bool = Field(True, description="3 candidate masks (True) or 1")


class _TooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413, f"request body is larger than the {limit / 2**20:g} MiB limit; send a smaller image"
        )


class BodyLimit:
    """ASGI middleware: 413 for bodies above `max_bytes`, by Content-Length or while streaming."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        seen = 0
        exceeded = started = False

        async def limited() -> dict:
            nonlocal seen, exceeded
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                exceeded = True
                raise _TooLarge(self.max_bytes)
            return message

        async def guarded(message: dict) -> None:
            # Body parsers may turn the error raised in `limited` into their own 400: answer 413 instead.
            nonlocal started
            if exceeded:
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self._reject(scope, receive, send)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, guarded)
        except _TooLarge:
            if not started:
                await self._reject(scope, receive, send)

    async def _reject(self, scope: dict, receive: Any, send: Any) -> None:
        detail = _TooLarge(self.max_bytes).detail
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


def _status_of(exc: SamkitError) -> int:
    if isinstance(exc, InputError):
        return 400
    if isinstance(exc, StateError):
        return 409
    return 500


def decode_upload(data: bytes, max_pixels: int) -> np.ndarray:
    """Uploaded file bytes -> (H, W, 3) uint8 RGB; ImageError (400) if empty, unreadable or too large."""
    from samkit.image import load_image

    if not data:
        raise ImageError("the upload is empty; send an image file in the form field 'file'")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
    except Exception as exc:  # PIL raises several types for non-images
        raise ImageError(
            f"the upload is not a readable image ({type(exc).__name__}); send a JPEG or PNG"
        ) from None
    if w * h > max_pixels:
        raise ImageError(f"image is {w}x{h} = {w * h} pixels; this server accepts up to {max_pixels}")
    try:
        img.load()
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"the image is corrupt or truncated ({first}); send the file again") from None
    return load_image(img)


class Service:
    """The model, a Predictor guarded by a lock, and the embedding cache."""

    def __init__(self, config: ServeConfig) -> None:
        import samkit
        from samkit.download import cache_dir

        self.config = config
        self.model = samkit.load(config.model, progress=False)
        self.name = self.model.arch or Path(str(config.model)).stem
        self.predictor = samkit.Predictor(self.model)
        self.lock = threading.Lock()
        root = Path(config.cache_dir) if config.cache_dir else cache_dir() / "serve" / self.name
        self.cache = EmbeddingCache(root, config.max_embeddings)

    def embedding_id(self, data: bytes) -> str:
        return hashlib.sha256(self.name.encode() + b"\0" + data).hexdigest()[:32]

    def embed(self, data: bytes) -> dict[str, Any]:
        key = self.embedding_id(data)
        path = self.cache.get(key)
        cached = path is not None
        if path is None:
            image = decode_upload(data, self.config.max_image_pixels)
            path = self.cache.path(key)
            with self.lock:
                self.predictor.set_image(image)
                self.predictor.save_embedding(path)
            self.cache.added(key)
        meta = _embedding_meta(path)
        h, w = meta["original_size"]
        return {"embedding_id": key, "height": h, "width": w, "model": self.name, "cached": cached}

    def _path(self, key: str) -> Path:
        path = self.cache.get(key) if all(c in "0123456789abcdef" for c in key) else None
        if path is None:
            raise HTTPException(
                404, f"unknown embedding id {key!r}: POST the image to /embed (old ids are evicted)"
            )
        return path

    def predict(self, body: PredictBody) -> dict[str, Any]:
        from samkit.masks import masks_to_coco_rle

        path = self._path(body.embedding_id)
        coords = None if body.points is None else np.asarray(body.points, dtype=np.float64).reshape(-1, 2)
        labels = None if body.labels is None else np.asarray(body.labels, dtype=np.int64)
        with self.lock:
            try:
                self.predictor.load_embedding(path)
            except CheckpointError:
                raise HTTPException(
                    404, f"embedding {body.embedding_id} is gone: POST the image again"
                ) from None
            masks, scores, _ = self.predictor.predict(
                coords, labels, body.box, multimask_output=body.multimask
            )
            h, w = self.predictor.original_size
        order = np.argsort(-scores, kind="stable")
        rles = masks_to_coco_rle(masks[order])
        return {
            "embedding_id": body.embedding_id,
            "height": h,
            "width": w,
            "masks": [
                {
                    "segmentation": rle,
                    "predicted_iou": float(scores[i]),
                    "area": int(masks[i].sum()),
                    "candidate": int(i),
                }
                for rle, i in zip(rles, order, strict=True)
            ],
        }

    def everything(self, data: bytes, file_name: str, points_per_side: int) -> dict[str, Any]:
        from samkit.formats import sa1b_dict

        try:
            from samkit.everything import MaskGenerator
        except ImportError:
            raise HTTPException(501, "segment-everything is not available in this samkit install") from None
        image = decode_upload(data, self.config.max_image_pixels)
        generator = MaskGenerator(self.model, points_per_side=points_per_side, output_mode="coco_rle")
        with self.lock:
            records = generator.generate(image)
        h, w = image.shape[:2]
        info = {"image_id": self.embedding_id(data), "width": w, "height": h, "file_name": file_name}
        return sa1b_dict(info, records)


def _embedding_meta(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    return {"original_size": [int(v) for v in meta["original_size"].split(",")]}


async def _read_upload(file: UploadFile, limit: int) -> bytes:
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise _TooLarge(limit)
    return data


def create_app(config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI application; loads the model now, so the first request does not wait for it."""
    config = config or ServeConfig()
    service = Service(config)
    limit = int(config.max_upload_mb * 2**20)
    app = FastAPI(
        title="samkit serve",
        summary="Segment Anything as a service: embed an image once, then segment with clicks and boxes.",
        version="1",
    )
    app.add_middleware(BodyLimit, max_bytes=limit)
    app.state.service = service

    @app.exception_handler(SamkitError)
    def _samkit_error(_: Request, exc: SamkitError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=_status_of(exc))

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness and what is loaded."""
        return {"status": "ok", "model": service.name, "embeddings_cached": len(service.cache)}

    @app.get("/models")
    def models() -> dict[str, Any]:
        """Every model samkit knows, and the one this server runs."""
        from samkit.zoo import describe_models

        return {"serving": service.name, "models": describe_models()}

    @app.post("/embed")
    async def embed(
        file: Annotated[UploadFile, File(description="the image (JPEG, PNG, ...)")],
    ) -> dict[str, Any]:
        """Encode an image; returns `embedding_id` (the same for the same bytes) and the image size."""
        data = await _read_upload(file, limit)
        return await run_in_threadpool(service.embed, data)

    @app.get("/embeddings/{embedding_id}")
    def embedding(embedding_id: str) -> Response:
        """The embedding as raw little-endian float32 (1, 256, 64, 64); image size in X-Image-Size (H,W)."""
        from safetensors.numpy import load_file

        path = service._path(embedding_id)
        arr = load_file(str(path))["embedding"].astype("<f4")
        h, w = _embedding_meta(path)["original_size"]
        headers = {"X-Image-Size": f"{h},{w}", "X-Shape": ",".join(str(s) for s in arr.shape)}
        return Response(arr.tobytes(), media_type="application/octet-stream", headers=headers)

    @app.post("/predict")
    def predict(body: PredictBody) -> dict[str, Any]:
        """Masks for one prompt on an embedded image, best predicted IoU first, as COCO RLE."""
        return service.predict(body)

    @app.post("/everything")
    async def everything(
        file: Annotated[UploadFile, File(description="the image (JPEG, PNG, ...)")],
        points_per_side: Annotated[int, Query(ge=1, le=64, description="grid of n x n point prompts")] = 32,
    ) -> dict[str, Any]:
        """Segment everything in the image; returns the SA-1B JSON document."""
        data = await _read_upload(file, limit)
        name = file.filename or "upload"
        return await run_in_threadpool(service.everything, data, name, points_per_side)

    return app


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory` / several workers: the config comes as JSON in $SAMKIT_SERVE_CONFIG."""
    raw = os.environ.get(CONFIG_ENV, "{}")
    return create_app(ServeConfig(**json.loads(raw)))


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Run the service with uvicorn until interrupted. Each worker process loads its own model."""
    import uvicorn

    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    print(f"samkit serve: http://{host}:{port}/docs ({workers} worker(s))", flush=True)
    if workers == 1:
        uvicorn.run(create_app(config), host=host, port=port, log_level="warning")
        return
    os.environ[CONFIG_ENV] = json.dumps(asdict(config))
    uvicorn.run(
        "samkit.serve.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="warning",
    )
