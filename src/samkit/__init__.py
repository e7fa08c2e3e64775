"""samkit: Segment Anything for real users.

`samkit.load(name_or_path)` opens a model, `Predictor` answers prompts on one image, `MaskGenerator`
segments everything.
"""

from typing import TYPE_CHECKING, Any

from samkit.errors import SamkitError
from samkit.image import load_image

if TYPE_CHECKING:
    from samkit.everything import MaskGenerator
    from samkit.onnx_predictor import OnnxPredictor
    from samkit.predictor import Predictor
    from samkit.zoo import DEFAULT_MODEL, load, registry, save

# Torch-backed names are imported on first use, so that `samkit.OnnxPredictor` works where only the
# onnx extra (numpy, pillow, onnxruntime) is installed.
_LAZY = {
    "DEFAULT_MODEL": "samkit.zoo",
    "load": "samkit.zoo",
    "registry": "samkit.zoo",
    "save": "samkit.zoo",
    "Predictor": "samkit.predictor",
    "MaskGenerator": "samkit.everything",
    "OnnxPredictor": "samkit.onnx_predictor",
}


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    try:  # `samkit.zoo` etc. without importing the submodule first, as when all of it was imported eagerly
        return importlib.import_module(f"samkit.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"samkit.{name}":
            raise
    raise AttributeError(f"module 'samkit' has no attribute {name!r}")


__all__ = [
    "DEFAULT_MODEL",
    "MaskGenerator",
    "OnnxPredictor",
    "Predictor",
    "SamkitError",
    "load",
    "load_image",
    "registry",
    "save",
]
__version__ = "0.1.0"
