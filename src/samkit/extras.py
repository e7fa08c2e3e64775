"""Optional dependencies, grouped as the pip extras of pyproject.toml, and the error when one is missing.

`pip install samkit` is enough to segment, run segment-everything and train; the web apps (`samkit serve`,
`samkit annotate`) need `samkit[app]`, the plots and edge matching of `samkit eval` need `samkit[eval]`, and
`samkit export-onnx` needs `samkit[export]`.
"""

from __future__ import annotations

import importlib

from samkit.errors import MissingExtraError

# extra -> (pip name, importable module names: any one of them will do)
EXTRAS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "app": (
        ("fastapi", ("fastapi",)),
        ("uvicorn", ("uvicorn",)),
        ("python-multipart", ("python_multipart", "multipart")),
    ),
    "eval": (
        ("matplotlib", ("matplotlib",)),
        ("pyedgeeval", ("pyEdgeEval",)),
    ),
    "export": (
        ("onnx", ("onnx",)),
        ("onnxruntime", ("onnxruntime",)),
        ("onnxscript", ("onnxscript",)),
    ),
}


def _importable(modules: tuple[str, ...]) -> bool:
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        return True
    return False


def require(extra: str, what: str) -> None:
    """Raise MissingExtraError, naming `extra`, unless every package of that extra imports.

    `what` names the feature that needs it, e.g. "samkit serve"."""
    missing = [pip_name for pip_name, modules in EXTRAS[extra] if not _importable(modules)]
    if missing:
        raise MissingExtraError(f"{what} needs {', '.join(missing)}: pip install 'samkit[{extra}]'")
