"""`samkit labelstudio`: a Label Studio ML backend (install with `pip install 'samkit[labelstudio]'`).

Label Studio's smart keypoints and rectangles become `brushlabels` masks from `samkit.Predictor`;
with `auto`, whole tasks are pre-labelled with `samkit.MaskGenerator`. See docs/labelstudio.md.
"""

from samkit.labelstudio.app import create_app, serve
from samkit.labelstudio.backend import Backend, BackendConfig
from samkit.labelstudio.protocol import LabelConfig, Prompt, brush_result, decode_brush, parse_label_config

__all__ = [
    "Backend",
    "BackendConfig",
    "LabelConfig",
    "Prompt",
    "brush_result",
    "create_app",
    "decode_brush",
    "parse_label_config",
    "serve",
]
