"""samkit: Segment Anything for real users.

`samkit.load(name_or_path)` opens a model, `Predictor` answers prompts on one image, `MaskGenerator`
segments everything.
"""

from samkit.errors import SamkitError
from samkit.image import load_image
from samkit.predictor import Predictor
from samkit.zoo import DEFAULT_MODEL, load, registry, save

__all__ = ["DEFAULT_MODEL", "Predictor", "SamkitError", "load", "load_image", "registry", "save"]
__version__ = "0.1.0"
