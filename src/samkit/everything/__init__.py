"""Segment everything: point grids over the image and its crops, batched decoding, filtering, NMS, cleanup."""

from samkit.everything.generator import MaskGenerator

__all__ = ["MaskGenerator"]
