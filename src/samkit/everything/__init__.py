"""Segment everything: point grids over the image and its crops, batched decoding, filtering, NMS, cleanup."""

from typing import TYPE_CHECKING, Any

from samkit.everything.settings import DEFAULTS, GeneratorSettings

if TYPE_CHECKING:
    from samkit.everything.generator import MaskGenerator


def __getattr__(name: str) -> Any:
    # MaskGenerator needs torch; imported on first use, so that `GeneratorSettings` does not.
    if name == "MaskGenerator":
        from samkit.everything.generator import MaskGenerator

        return MaskGenerator
    raise AttributeError(f"module 'samkit.everything' has no attribute {name!r}")


__all__ = ["DEFAULTS", "GeneratorSettings", "MaskGenerator"]
