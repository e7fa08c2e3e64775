"""What every predictor front end (torch `Predictor`, onnxruntime `OnnxPredictor`) shares: prompt checking,
and `PredictorBase` (the current image's state, its embedding file, `predict()` for one prompt).

numpy only, so the torch-free ONNX path can use it. Frames: points (x, y) and boxes XYXY in original-image
pixels; labels 1 foreground, 0 background, -1 padding; mask prompts are low-res logits.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from samkit import embedding_file
from samkit.embedding_file import EmbeddingInfo, EncoderId
from samkit.errors import PromptError, StateError

Prompts = tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, np.ndarray | None]

# Points per prompt. The decoder's tokens attend to each other, so memory grows with the square of the
# point count (50,000 points: tens of GB); SAM was trained with a handful, interactive tools send < 20.
MAX_POINTS = 64


def one_prompt_as_batch(
    point_coords: Any, point_labels: Any, box: Any, mask_input: Any, mask_size: tuple[int, int]
) -> Prompts:
    """`predict()`'s single prompt -> `predict_batch()`'s arrays with a leading batch dimension of 1.

    point_coords (N, 2) -> (1, N, 2); point_labels (N,) -> (1, N); box (4,) -> (1, 4);
    mask_input (1, h, w) or (h, w) -> (1, 1, h, w).
    """
    coords = None if point_coords is None else _numbers(point_coords, _COORDS)[None]
    labels = None if point_labels is None else _numbers(point_labels, _LABELS)[None]
    boxes = None if box is None else _numbers(box, _BOX)
    if boxes is not None:
        boxes = boxes.reshape(1, 4) if boxes.size == 4 else boxes[None]
    if mask_input is not None:
        mask_input = np.asarray(mask_input, dtype=np.float32)
        if mask_input.shape == tuple(mask_size):
            mask_input = mask_input[None]
        mask_input = mask_input[None]
    return coords, labels, boxes, mask_input


_COORDS = "point_coords must be (N, 2) XY pixels (batched: (B, N, 2))"
_LABELS = "point_labels must be one number per point: 1 foreground, 0 background"
_BOX = "box must be XYXY [x0, y0, x1, y1] pixels (batched: (B, 4))"


def _numbers(value: Any, expected: str) -> np.ndarray:
    """`value` as a float64 array; PromptError(`expected`) if it is not one (ragged rows, non-numbers)."""
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise PromptError(
            f"{expected}, got rows of different lengths or values that are not numbers"
        ) from None


def check_prompts(
    coords: Any,
    labels: Any,
    boxes: Any,
    mask_input: Any,
    original_size: tuple[int, int],
    mask_size: tuple[int, int] = (256, 256),
) -> Prompts:
    """Validate a batch of prompts against an (H, W) image; raise `PromptError` with one line if bad.

    coords (B, N, 2), labels (B, N), boxes (B, 4), mask_input (B, 1, h, w); returns them as float64 /
    float64 / float64 / float32 arrays (None where absent).
    """
    h, w = original_size
    if (coords is None) != (labels is None):
        raise PromptError("point_coords and point_labels must be given together")
    if coords is None and boxes is None and mask_input is None:
        raise PromptError("no prompt: give point_coords + point_labels, a box, or a mask_input")
    sizes = set()
    if coords is not None:
        coords = _numbers(coords, _COORDS)
        labels = _numbers(labels, _LABELS)
        if coords.ndim != 3 or coords.shape[-1] != 2:
            raise PromptError(f"{_COORDS}, got shape {coords.shape}")
        if labels.shape != coords.shape[:2]:
            raise PromptError(
                f"point_labels must have one label per point: {labels.shape} vs {coords.shape[:2]}"
            )
        if coords.shape[1] > MAX_POINTS:
            raise PromptError(f"too many points ({coords.shape[1]}) in one prompt; {MAX_POINTS} at most")
        bad = ~np.isin(labels, (0, 1, -1))
        if bad.any():
            raise PromptError(f"point label {labels[bad][0]:g} is not 1 (foreground) or 0 (background)")
        real = coords[labels != -1]
        outside = ~np.isfinite(real).all(1) | (real < 0).any(1) | (real[:, 0] > w) | (real[:, 1] > h)
        if outside.any():
            x, y = real[outside][0]
            raise PromptError(f"point ({x:g}, {y:g}) is outside the {w}x{h} image (x in 0..{w}, y in 0..{h})")
        sizes.add(coords.shape[0])
    if boxes is not None:
        boxes = _numbers(boxes, _BOX)
        if boxes.ndim == 0 or boxes.shape[-1] != 4:
            raise PromptError(f"{_BOX}, got shape {boxes.shape}")
        boxes = boxes.reshape(-1, 4)
        if not np.isfinite(boxes).all() or (boxes[:, 2:] < boxes[:, :2]).any():
            raise PromptError(f"box must be XYXY with x1 >= x0 and y1 >= y0, got {boxes[0].tolist()}")
        if (boxes[:, :2] > [w, h]).any() or (boxes[:, 2:] < 0).any():
            raise PromptError(f"box {boxes[0].tolist()} lies outside the {w}x{h} image")
        sizes.add(boxes.shape[0])
    if mask_input is not None:
        mask_input = np.asarray(mask_input, dtype=np.float32)
        if mask_input.ndim != 4 or mask_input.shape[1:] != (1, *mask_size):
            raise PromptError(
                f"mask_input must be (1, {mask_size[0]}, {mask_size[1]}) low-res logits, got shape {mask_input.shape[1:]}"
            )
        sizes.add(mask_input.shape[0])
    if len(sizes) > 1:
        raise PromptError(f"prompt batch sizes differ: {sorted(sizes)}")
    return coords, labels, boxes, mask_input


class PredictorBase:
    """What `Predictor` and `OnnxPredictor` share: the current image (its embedding `features` and its
    frames), the embedding file either of them reads, and `predict()` for one prompt on top of their
    `predict_batch()`.

    Subclasses set `mask_input_size` (the (h, w) of low-res mask prompts), say who their encoder is
    (`_encoder_identity`), take an embedding in (`set_embedding`) and give it out as numpy (`_features_array`:
    `features` itself here), and decode checked prompts (`_decode_batch`).
    """

    mask_input_size: tuple[int, int]
    set_embedding: Callable[[np.ndarray, tuple[int, int]], None]

    # --- image -----------------------------------------------------------------------------------------

    def reset_image(self) -> None:
        """Forget the current image and its embedding."""
        self.features: Any = None
        self.original_size: tuple[int, int] = (0, 0)
        self.input_size: tuple[int, int] = (0, 0)

    @property
    def is_image_set(self) -> bool:
        return self.features is not None

    @property
    def embedding(self) -> Any:
        """The image embedding (1, 256, g, g): a float32 numpy array, or for `Predictor` a torch tensor
        on the model's device."""
        return self._require_image()

    def save_embedding(self, path: str | Path) -> None:
        """Write the embedding, the frame sizes needed to map prompts back and the encoder's identity
        (`samkit.embedding_file`); `Predictor` and `OnnxPredictor` read each other's files."""
        info = EmbeddingInfo(self.original_size, self.input_size, self._encoder_identity())
        embedding_file.save(path, self._features_array(), info)

    def load_embedding(self, path: str | Path) -> None:
        """Load an embedding file made by this model's encoder (same architecture and, where both record
        it, the same weights); CheckpointError otherwise."""
        feats, info = embedding_file.load(path, self._encoder_identity())
        self.set_embedding(feats, info.original_size)

    def _encoder_identity(self) -> EncoderId:
        """Who this predictor's encoder is, as embedding files record it."""
        raise NotImplementedError

    def _features_array(self) -> np.ndarray:
        """`features` as a (1, 256, g, g) numpy array; StateError before an image is set."""
        return self._require_image()

    def _require_image(self) -> Any:
        if self.features is None:
            raise StateError("no image set: call set_image() (or load_embedding()) before predict()")
        return self.features

    # --- prompts ---------------------------------------------------------------------------------------

    def predict_batch(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        low_res_logits: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """B prompts on the current image at once.

        point_coords: (B, N, 2) XY original pixels; point_labels: (B, N) in {1, 0}, or -1 for padding
        so prompts with different point counts can share a batch. A -1 point becomes SAM's "not a point"
        token (the one the reference appends to box-less prompts): its coordinates are ignored, but the
        decoder still attends to it, so results differ slightly from sending the prompt without it.
        boxes: (B, 4) XYXY original pixels. mask_input: (B, 1, 256, 256).
        Returns masks (B, C, H, W) bool (float logits if return_logits), scores (B, C), low-res logits
        (B, C, 256, 256) as numpy arrays, with C = 3 if multimask_output else 1.
        low_res_logits=False: the third result is None, and a predictor may skip the work only those
        logits need (the torch Predictor then decodes no logits over the image's padding).
        """
        self._require_image()
        prompts = check_prompts(
            point_coords, point_labels, boxes, mask_input, self.original_size, self.mask_input_size
        )
        masks, scores, logits = self._decode_batch(prompts, multimask_output, return_logits, low_res_logits)
        return masks, scores, logits if low_res_logits else None

    def _decode_batch(
        self, prompts: Prompts, multimask_output: bool, return_logits: bool, low_res_logits: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """`predict_batch`'s result for prompts `check_prompts` passed (arrays in original pixels); the
        low-res logits may be None when low_res_logits is False."""
        raise NotImplementedError

    def predict(
        self,
        point_coords: np.ndarray | list | None = None,
        point_labels: np.ndarray | list | None = None,
        box: np.ndarray | list | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        low_res_logits: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Masks for one prompt.

        point_coords: (N, 2) XY original pixels; point_labels: (N,) 1 = foreground, 0 = background.
        box: (4,) XYXY original pixels. mask_input: (1, 256, 256) low-res logits from a previous call.
        Returns masks (C, H, W) bool (float logits if return_logits), scores (C,) predicted IoU, and
        low-res logits (C, 256, 256), with C = 3 if multimask_output else 1 (None with
        low_res_logits=False, which spares the torch Predictor the logits over the image's padding).
        """
        coords, labels, boxes, mask_input = one_prompt_as_batch(
            point_coords, point_labels, box, mask_input, self.mask_input_size
        )
        masks, scores, logits = self.predict_batch(
            coords, labels, boxes, mask_input, multimask_output, return_logits, low_res_logits
        )
        return masks[0], scores[0], None if logits is None else logits[0]
