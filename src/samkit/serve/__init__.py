"""`samkit serve`: Segment Anything over HTTP (FastAPI). See `create_app` and `serve`."""

from samkit.serve.app import ServeConfig, create_app, serve

__all__ = ["ServeConfig", "create_app", "serve"]
