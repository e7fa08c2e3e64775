"""The ML backend's HTTP side: the endpoints Label Studio calls, as a FastAPI app.

GET /health (and /): liveness. POST /setup: Label Studio connects a project (its labelling config, the
server's URL and an API token). POST /predict: `{"tasks", "label_config", "params": {"context"}}` ->
`{"results": [prediction per task]}`. POST /webhook: annotation events, acknowledged (samkit does not
train from them). GET /versions: the model version, named by the encoder weights' fingerprint.
"""

from __future__ import annotations

from typing import Any

from fastapi import Body, FastAPI

from samkit.labelstudio.backend import Backend, BackendConfig
from samkit.web import BodyLimit, install_error_handlers

# Label Studio's bodies: tasks and their prompts, annotations (brush RLE) on the webhook; megabytes at most.
MAX_BODY_BYTES = 32 * 2**20


def create_app(config: BackendConfig | None = None, backend: Backend | None = None) -> FastAPI:
    """The backend's FastAPI app; loads the model now, so Label Studio's first request does not wait."""
    backend = backend or Backend(config or BackendConfig())
    app = FastAPI(title="samkit Label Studio ML backend", version="1")
    app.state.backend = backend
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    install_error_handlers(app, log_as="samkit labelstudio")

    @app.get("/")
    @app.get("/health")
    def health() -> dict[str, Any]:
        """Label Studio's health check."""
        return {"status": "UP", "model_class": "samkit", "model_version": backend.model_version}

    @app.post("/setup")
    def setup(body: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        """A project connects: check its labelling config, remember the server's URL and token."""
        return backend.setup(body)

    @app.post("/predict")
    def predict(body: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        """Predictions for tasks: the mask of an interactive prompt, or (with --auto) every mask."""
        return backend.predict(body)

    @app.post("/webhook")
    def webhook(body: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        """Annotation events: acknowledged; the model is not trained from them."""
        return {"status": "ok", "action": body.get("action"), "trained": False}

    @app.get("/versions")
    def versions() -> dict[str, Any]:
        return {"versions": [backend.model_version]}

    return app


def serve(config: BackendConfig, host: str = "127.0.0.1", port: int = 9090) -> None:
    """Run the backend with uvicorn until interrupted."""
    import uvicorn

    app = create_app(config)
    print(
        f"samkit labelstudio: ML backend on http://{host}:{port} ({app.state.backend.model_version}); "
        "add it in Label Studio under Settings > Model",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")
