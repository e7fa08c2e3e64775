"""`samkit serve`: a FastAPI service that embeds an image once and answers prompts on it.

Endpoints: POST /embed (image upload -> embedding id), POST /predict (embedding id + prompts -> COCO RLE
masks and scores), GET /embeddings/{id} (the raw embedding, for clients that decode locally),
POST /everything (image -> SA-1B JSON), GET /models, GET /health; OpenAPI docs at /docs.
Coordinates: points (x, y) and boxes XYXY in original-image pixels.

Concurrency: clicks are decoded in a pool of threads (one per core, one torch thread each) on
embeddings kept loaded in memory, so clients do not wait for each other's clicks; encodes (/embed,
/everything) run at most `max_encodes` at a time with `max_waiting` more queued (503 beyond).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import Response
from PIL import Image
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from samkit import embedding_file
from samkit.devices import limit_this_thread
from samkit.embedding_file import fingerprint
from samkit.errors import CheckpointError, ImageError, InputError, NotFoundError
from samkit.serve.cache import EmbeddingCache
from samkit.web import (
    MAX_JSON_BYTES,
    UVICORN_CONNECTIONS,
    Access,
    BodyLimit,
    Guard,
    install_error_handlers,
    too_large_message,
    warn_if_open,
)
from samkit.web_schema import PromptFields

CONFIG_ENV = "SAMKIT_SERVE_CONFIG"


@dataclass
class ServeConfig:
    """What the service loads and how much it accepts.

    model: zoo name or checkpoint path (None: the default model). cache_dir: where embeddings are kept
    (default: $SAMKIT_HOME/serve/<model>). max_embeddings: LRU bound of that cache. max_upload_mb: request
    body limit (413 beyond). max_image_pixels: image size limit, width x height (400 beyond; None:
    samkit's limit for every image, $SAMKIT_MAX_PIXELS). dtype: image encoder precision for
    `samkit.load` ("auto": bf16 where the hardware runs it natively, else fp32).
    token: the token every request must carry (None: none). hosts: Host header names accepted (None:
    any; `serve` fills it from the address it listens on, see `samkit.web.Access.for_bind`).
    decode_threads: clicks decoded at once (0: one per CPU core). max_encodes: images encoded at once
    (/embed, /everything); max_waiting: more encode requests queued, beyond which the answer is 503.
    prompt_head: the head file for `/everything?prompts=learned`, trained for `model` (None: the one
    shipped for vit_t, loaded on the first such request); a given file is loaded and checked at start.
    """

    model: str | None = None
    cache_dir: str | None = None
    max_embeddings: int = 256
    max_upload_mb: float = 32.0
    max_image_pixels: int | None = None
    dtype: str = "auto"
    token: str | None = None
    hosts: list[str] | None = None
    decode_threads: int = 0
    max_encodes: int = 1
    max_waiting: int = 8
    prompt_head: str | None = None


# Embeddings kept loaded for clicks (each a few MB); the disk cache behind them keeps `max_embeddings`.
LOADED_EMBEDDINGS = 8
# Clicks waiting for a decode thread, beyond which the answer is 503.
MAX_PENDING_CLICKS = 256
# Seconds an encode request waits for its turn before the answer is 503.
ENCODE_WAIT_SECONDS = 120.0
# Segment-everything needs a few pixels per side; smaller uploads get a 400.
MIN_EVERYTHING_SIDE = 8


class PredictBody(PromptFields):
    """The prompt every samkit web app takes (`PromptFields`) on the image of `embedding_id`."""

    embedding_id: str = Field(max_length=64, description="id returned by POST /embed")
    multimask: bool = Field(True, description="3 candidate masks (true) or 1")


def decode_upload(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """Uploaded file bytes -> (H, W, 3) uint8 RGB in the frame viewers show (EXIF orientation applied);
    ImageError (400) if empty, unreadable, or over `max_pixels` (None: samkit's image limit), which is
    checked from the header before decoding."""
    from samkit.image import check_pixels, load_image

    if not data:
        raise ImageError("the upload is empty; send an image file in the form field 'file'")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
    except Exception as exc:  # PIL raises several types for non-images
        raise ImageError(
            f"the upload is not a readable image ({type(exc).__name__}); send a JPEG or PNG"
        ) from None
    if max_pixels is None:
        check_pixels(w, h, what="the upload")
    elif w * h > max_pixels:
        raise ImageError(f"image is {w}x{h} = {w * h} pixels; this server accepts up to {max_pixels}")
    try:
        img.load()
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"the image is corrupt or truncated ({first}); send the file again") from None
    return load_image(img)


class Busy(HTTPException):
    """503: the server has as much work queued as it accepts; the client should retry shortly."""

    def __init__(self, what: str) -> None:
        super().__init__(503, f"the server is busy ({what}); retry in a few seconds", {"Retry-After": "5"})


class EncodeGate:
    """At most `running` encodes at a time and `waiting` more queued; beyond that, or after waiting
    `timeout` seconds, `Busy`. Admission comes before the upload is read into memory, and images are
    decoded only once running, which bounds the memory that queued requests hold."""

    def __init__(self, running: int, waiting: int, timeout: float = ENCODE_WAIT_SECONDS) -> None:
        if running < 1 or waiting < 0:
            raise InputError(f"max_encodes must be >= 1 and max_waiting >= 0, got {running} and {waiting}")
        self._slots = threading.Semaphore(running)
        self._room = threading.Semaphore(running + waiting)
        self.timeout = timeout

    @contextmanager
    def admitted(self) -> Iterator[None]:
        if not self._room.acquire(blocking=False):
            raise Busy("too many images waiting to be encoded")
        try:
            yield
        finally:
            self._room.release()

    @contextmanager
    def running(self) -> Iterator[None]:
        if not self._slots.acquire(timeout=self.timeout):
            raise Busy(f"no encoder free within {self.timeout:g} s")
        try:
            yield
        finally:
            self._slots.release()


class Service:
    """The model, the embedding cache on disk, the embeddings loaded for clicks, and the two queues:
    decode threads for clicks and the encode gate for images."""

    def __init__(self, config: ServeConfig) -> None:
        import samkit
        from samkit.download import cache_dir

        self.config = config
        self.model = samkit.load(config.model, dtype=config.dtype, progress=False)
        self.name = self.model.arch or Path(str(config.model)).stem
        # Embeddings are only reusable by the exact encoder weights that made them: a fine-tune loads as
        # its base architecture's name, so the cache and the ids are keyed on the weights' fingerprint.
        self.encoder = fingerprint(self.model)
        root = (
            Path(config.cache_dir)
            if config.cache_dir
            else cache_dir() / "serve" / f"{self.name}-{self.encoder}"
        )
        self.cache = EmbeddingCache(root, config.max_embeddings)
        self.encodes = EncodeGate(config.max_encodes, config.max_waiting)
        threads = config.decode_threads or len(os.sched_getaffinity(0))
        # Each decode thread runs its ops on one core; encodes (other threads) keep all of them. Where a
        # thread's count cannot be set alone, decode threads keep torch's count rather than change everyone's.
        self.decoders = ThreadPoolExecutor(
            threads, "samkit-decode", initializer=limit_this_thread, initargs=(1,)
        )
        self._pending = 0
        self._loaded: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._head: Any = None
        self._head_lock = threading.Lock()
        if config.prompt_head:  # a head the operator named: a wrong one stops the server at start
            self.prompt_head()

    def prompt_head(self) -> Any:
        """The PromptHead of learned prompts (loaded once, checked against the model: InputError if it
        was trained for another architecture)."""
        from samkit.everything.learned import check_head, load_head

        with self._head_lock:
            if self._head is None:
                head = load_head(self.config.prompt_head)
                check_head(head, self.model)
                self._head = head.to(self.model.device)
            return self._head

    def embedding_id(self, data: bytes) -> str:
        return hashlib.sha256(self.encoder.encode() + b"\0" + data).hexdigest()[:32]

    def embed(self, data: bytes) -> dict[str, Any]:
        import samkit

        key = self.embedding_id(data)
        path = self.cache.get(key)
        cached = path is not None
        if path is None:
            path = self.cache.path(key)
            predictor = samkit.Predictor(self.model)
            with self.encodes.running():  # decoded images too take memory: only the running ones exist
                predictor.set_image(decode_upload(data, self.config.max_image_pixels))
            predictor.save_embedding(path)
            self.cache.added(key)
        h, w = embedding_file.read_info(path).original_size
        return {"embedding_id": key, "height": h, "width": w, "model": self.name, "cached": cached}

    def _path(self, key: str) -> Path:
        valid = len(key) == 32 and all(c in "0123456789abcdef" for c in key)
        path = self.cache.get(key) if valid else None
        if path is None:
            raise NotFoundError(
                f"unknown embedding id {key!r}: POST the image to /embed (old ids are evicted)"
            )
        return path

    def predictor(self, key: str) -> Any:
        """A Predictor holding embedding `key`, from the in-memory LRU or loaded from the disk cache.

        Decode threads share it: predicting only reads the embedding (and fills per-image caches that
        any thread computes alike)."""
        import samkit

        with self._lock:
            pred = self._loaded.get(key)
            if pred is not None:
                self._loaded.move_to_end(key)
                return pred
        path = self._path(key)
        pred = samkit.Predictor(self.model)
        try:
            pred.load_embedding(path)
        except CheckpointError:
            raise NotFoundError(f"embedding {key} is gone: POST the image again") from None
        with self._lock:
            self._loaded[key] = pred
            while len(self._loaded) > LOADED_EMBEDDINGS:
                self._loaded.popitem(last=False)
        return pred

    async def decode(self, body: PredictBody) -> dict[str, Any]:
        """`predict` on a decode thread; 503 when MAX_PENDING_CLICKS are already waiting."""
        with self._lock:
            if self._pending >= MAX_PENDING_CLICKS:
                raise Busy(f"{self._pending} clicks queued")
            self._pending += 1
        try:
            return await asyncio.wrap_future(self.decoders.submit(self.predict, body))
        finally:
            with self._lock:
                self._pending -= 1

    def predict(self, body: PredictBody) -> dict[str, Any]:
        from samkit.masks import masks_to_coco_rle

        pred = self.predictor(body.embedding_id)
        masks, scores, _ = pred.predict(
            *body.predict_args(), multimask_output=body.multimask, low_res_logits=False
        )
        h, w = pred.original_size
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

    def everything(
        self, data: bytes, file_name: str, points_per_side: int, prompts: str = "grid"
    ) -> dict[str, Any]:
        from samkit.everything import MaskGenerator
        from samkit.formats import sa1b_dict

        head = self.prompt_head() if prompts == "learned" else None
        generator = MaskGenerator(
            self.model,
            points_per_side=points_per_side,
            output_mode="coco_rle",
            prompts=prompts,  # type: ignore[arg-type]
            prompt_head=head,
        )
        with self.encodes.running():
            image = decode_upload(data, self.config.max_image_pixels)
            h, w = image.shape[:2]
            if min(h, w) < MIN_EVERYTHING_SIDE:
                raise ImageError(
                    f"image is {w}x{h}: too small to segment everything in; send at least "
                    f"{MIN_EVERYTHING_SIDE}x{MIN_EVERYTHING_SIDE} pixels"
                )
            records = generator.generate(image)
        info = {"image_id": self.embedding_id(data), "width": w, "height": h, "file_name": file_name}
        return sa1b_dict(info, records)

    def close(self) -> None:
        self.decoders.shutdown(wait=False, cancel_futures=True)


async def _read_upload(file: UploadFile, limit: int) -> bytes:
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, too_large_message(limit))
    return data


def create_app(config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI application; loads the model now, so the first request does not wait for it.

    Access (token, Host names) comes from `config.token` and `config.hosts`; with neither, every
    request is answered (`serve` sets both from the address it listens on).
    """
    config = config or ServeConfig()
    service = Service(config)
    limit = int(config.max_upload_mb * 2**20)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    app = FastAPI(
        title="samkit serve",
        summary="Segment Anything as a service: embed an image once, then segment with clicks and boxes.",
        version="1",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, max_bytes=MAX_JSON_BYTES, per_path={"/embed": limit, "/everything": limit})
    access = Access(config.token, None if config.hosts is None else frozenset(config.hosts))
    app.add_middleware(Guard, access=access)
    app.state.service = service
    install_error_handlers(app)

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
        with service.encodes.admitted():
            data = await _read_upload(file, limit)
            return await run_in_threadpool(service.embed, data)

    @app.get("/embeddings/{embedding_id}")
    def embedding(embedding_id: str) -> Response:
        """The embedding as raw little-endian float32 (1, 256, 64, 64); image size in X-Image-Size (H,W)."""
        path = service._path(embedding_id)
        arr, info = embedding_file.load(path, embedding_file.EncoderId.of(service.model))
        arr = arr.astype("<f4")
        h, w = info.original_size
        headers = {"X-Image-Size": f"{h},{w}", "X-Shape": ",".join(str(s) for s in arr.shape)}
        return Response(arr.tobytes(), media_type="application/octet-stream", headers=headers)

    @app.post("/predict")
    async def predict(body: PredictBody) -> dict[str, Any]:
        """Masks for one prompt on an embedded image, best predicted IoU first, as COCO RLE."""
        return await service.decode(body)

    @app.post("/everything")
    async def everything(
        file: Annotated[UploadFile, File(description="the image (JPEG, PNG, ...)")],
        points_per_side: Annotated[int, Query(ge=1, le=64, description="grid of n x n point prompts")] = 32,
        prompts: Annotated[
            Literal["grid", "learned"],
            Query(description="grid: n x n points; learned: the prompt head's points (far fewer, faster)"),
        ] = "grid",
    ) -> dict[str, Any]:
        """Segment everything in the image; returns the SA-1B JSON document."""
        with service.encodes.admitted():
            data = await _read_upload(file, limit)
            name = file.filename or "upload"
            return await run_in_threadpool(service.everything, data, name, points_per_side, prompts)

    return app


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory` / several workers: the config comes as JSON in $SAMKIT_SERVE_CONFIG."""
    raw = os.environ.get(CONFIG_ENV, "{}")
    return create_app(ServeConfig(**json.loads(raw)))


def serve(
    config: ServeConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    allow_hosts: Sequence[str] = (),
) -> None:
    """Run the service with uvicorn until interrupted. Each worker process loads its own model.

    Access: `config.token` (or $SAMKIT_TOKEN) if set; Host names from `Access.for_bind(host, ...,
    allow_hosts)` (on a loopback address only localhost, 127.0.0.1, [::1] and `allow_hosts`).
    """
    import uvicorn

    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    access = Access.for_bind(host, config.token, allow_hosts)
    config = replace(config, token=access.token, hosts=None if access.hosts is None else sorted(access.hosts))
    print(f"samkit serve: http://{host}:{port}/docs ({workers} worker(s))", flush=True)
    warn_if_open(host, access)
    options = {"host": host, "port": port, "log_level": "warning", "limit_concurrency": UVICORN_CONNECTIONS}
    if workers == 1:
        uvicorn.run(create_app(config), **options)
        return
    os.environ[CONFIG_ENV] = json.dumps(asdict(config))
    uvicorn.run("samkit.serve.app:app_from_env", factory=True, workers=workers, **options)
