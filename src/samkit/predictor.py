"""Predictor: encode an image once with `set_image`, then answer prompts with `predict` in milliseconds."""

from __future__ import annotations

import numpy as np
import torch

from samkit.decoding import EmbeddedImage
from samkit.embedding_file import EncoderId
from samkit.image import ImageLike, load_image
from samkit.masks.upscale import interpolate_logits, upscale_logits
from samkit.models.sam import Sam
from samkit.prompts import PredictorBase, Prompts
from samkit.transforms import ImagePipeline


class Predictor(PredictorBase):
    """Promptable segmentation of one image at a time.

    Coordinate frames: points are (x, y) and boxes XYXY, both in original-image pixels; masks come back at
    the original size (H, W). Low-res logits are (256, 256) in the padded model-input frame and can be fed
    back as `mask_input` on the next call. The decoding itself is `samkit.decoding.EmbeddedImage`'s
    (`embedded_image`), which `MaskGenerator` runs too.
    """

    def __init__(self, model: Sam) -> None:
        self.model = model
        self.transform = ImagePipeline.of(model)
        self.mask_input_size = model.prompt_encoder.mask_input_size
        self.reset_image()

    # --- image -----------------------------------------------------------------------------------------

    def reset_image(self) -> None:
        """Forget the current image and its embedding."""
        super().reset_image()
        self._embedded: EmbeddedImage | None = None

    @property
    def embedded_image(self) -> EmbeddedImage:
        """The current image as the decoding core holds it (`samkit.decoding.EmbeddedImage`); StateError
        before an image is set."""
        features = self._require_image()
        image = self._embedded
        if (
            image is None
            or image.features is not features
            or (image.original_size, image.input_size) != (self.original_size, self.input_size)
        ):
            image = EmbeddedImage(self.model, features, self.original_size, self.input_size)
            self._embedded = image
        return image

    def set_image(self, image: ImageLike) -> None:
        """Encode `image`: an (H, W, 3) uint8 RGB or (H, W) gray array, a PIL image, or a path."""
        self.reset_image()
        self._use(EmbeddedImage.encode(self.model, load_image(image), self.transform))

    def set_torch_image(self, image: torch.Tensor, original_size: tuple[int, int]) -> None:
        """Encode an already resized image: (1, 3, h, w) RGB 0..255, longest side == model.image_size."""
        self.reset_image()
        self._use(EmbeddedImage.encode_torch(self.model, image, original_size, self.transform))

    def _use(self, image: EmbeddedImage) -> None:
        self.features = image.features
        self.original_size = image.original_size
        self.input_size = image.input_size
        self._embedded = image

    def set_embedding(self, embedding: np.ndarray, original_size: tuple[int, int]) -> None:
        """Use a (1, 256, g, g) embedding of an image of `original_size` (H, W) made by this model's encoder
        (as `load_embedding` does after checking the file)."""
        self.reset_image()
        self.features = torch.from_numpy(np.ascontiguousarray(embedding)).to(self.model.device)
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = self.transform.input_size(self.original_size)

    def _encoder_identity(self) -> EncoderId:
        return EncoderId.of(self.model)

    def _features_array(self) -> np.ndarray:
        return self._require_image().detach().cpu().numpy()

    # --- prompts ---------------------------------------------------------------------------------------

    def _decode_batch(
        self, prompts: Prompts, multimask_output: bool, return_logits: bool, low_res_logits: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """`predict_batch` after its checks. low_res_logits=False decodes the logits only over the image
        (not its padding): the same masks, ~5-20% sooner for non-square photos."""
        coords_t, labels_t, boxes_t, mask_t = self._prompts_to_torch(*prompts)
        scores, _, low_res = self.embedded_image.decode(
            coords_t, labels_t, boxes_t, mask_t, multimask_output, image_only=not low_res_logits
        )
        # Upsampled and thresholded on the model's device: from a GPU only the bool masks cross to the host.
        up = upscale_logits(low_res, self.model.image_size, self.input_size, self.original_size)
        if up.device.type == "cpu":  # numpy thresholds one click's full-size maps 2-4x faster than torch
            masks = up.numpy() if return_logits else up.numpy() > self.model.mask_threshold
        else:
            masks = (up if return_logits else up > self.model.mask_threshold).cpu().numpy()
        logits = low_res.float().cpu().numpy() if low_res_logits else None
        return masks, scores.float().cpu().numpy(), logits

    @torch.inference_mode()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Torch API in the model-input frame (use `self.transform.apply_coords_torch` to get there).

        point_coords: (B, N, 2), point_labels: (B, N), boxes: (B, 4), mask_input: (B, 1, 256, 256).
        Returns masks (B, C, H, W) at the original size, scores (B, C), low-res logits (B, C, 256, 256).
        """
        low_res, scores = self.decode_low_res(point_coords, point_labels, boxes, mask_input, multimask_output)
        masks = interpolate_logits(low_res, self.model.image_size, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, scores, low_res

    @torch.inference_mode()
    def decode_low_res(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits (B, C, 256, 256) and scores (B, C) only, without upsampling to the image size."""
        iou, _, low_res = self.embedded_image.decode(
            point_coords, point_labels, boxes, mask_input, multimask_output
        )
        return low_res, iou

    # --- validation ------------------------------------------------------------------------------------

    def _prompts_to_torch(
        self,
        coords: np.ndarray | None,
        labels: np.ndarray | None,
        boxes: np.ndarray | None,
        mask_input: np.ndarray | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Checked prompts (original pixels) -> tensors in the model-input frame on the model's device."""
        device = self.model.device
        coords_t = labels_t = boxes_t = mask_t = None
        if coords is not None:
            coords_t = torch.as_tensor(
                self.transform.apply_coords(coords, self.original_size), dtype=torch.float32, device=device
            )
            labels_t = torch.as_tensor(labels, dtype=torch.int64, device=device)
        if boxes is not None:
            boxes_t = torch.as_tensor(
                self.transform.apply_boxes(boxes, self.original_size), dtype=torch.float32, device=device
            )
        if mask_input is not None:
            mask_t = torch.as_tensor(mask_input, device=device)
        return coords_t, labels_t, boxes_t, mask_t
