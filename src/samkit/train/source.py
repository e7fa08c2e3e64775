"""What every training data source is: a random-access list of `Sample`s (image + object masks)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Sample:
    """One training image: `image` (H, W, 3) uint8 RGB, `masks` (N, H, W) bool, `key` unique per image."""

    key: str
    image: np.ndarray
    masks: np.ndarray


class Source:
    """A random-access list of samples.

    `name` prefixes every sample key; keys name embedding-cache entries, so they must differ between
    different images: file sources use their resolved path. `ident` also tells apart selections
    (`range`) of the same files."""

    name = "source"
    selection: Any = None  # the spec's `range`, if any

    @property
    def ident(self) -> str:
        return self.name if self.selection is None else f"{self.name}{list(self.selection)}"

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> Sample:
        raise NotImplementedError


def stack_masks(masks: Sequence[np.ndarray], h: int, w: int) -> np.ndarray:
    """The non-empty (h, w) bool masks stacked to (N, h, w); (0, h, w) when none is left."""
    kept = [m for m in masks if m.any()]
    return np.stack(kept) if kept else np.zeros((0, h, w), dtype=bool)
