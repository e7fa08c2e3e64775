"""samkit: Segment Anything for real users.

`samkit.load(name_or_path)` opens a model, `Predictor` answers prompts on one image, `MaskGenerator`
segments everything.
"""

from typing import TYPE_CHECKING, Any

from samkit.errors import SamkitError
from samkit.image import load_image

if TYPE_CHECKING:
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
    "OnnxPredictor": "samkit.onnx_predictor",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'samkit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_MODEL",
    "OnnxPredictor",
    "Predictor",
    "SamkitError",
    "load",
    "load_image",
    "registry",
    "save",
]
__version__ = "0.1.0"
