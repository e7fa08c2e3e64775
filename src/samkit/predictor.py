"""Predictor: encode an image once with `set_image`, then answer prompts with `predict` in milliseconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from samkit import embedding_file
from samkit.devices import cpu_tuned
from samkit.embedding_file import EmbeddingInfo, EncoderId
from samkit.errors import StateError
from samkit.image import ImageLike, load_image
from samkit.masks.upscale import Upscaler
from samkit.models.sam import Sam
from samkit.models.transformer import ImageSide
from samkit.prompts import PredictorBase, check_prompts
from samkit.transforms import ImagePipeline, upscale_logits

# Prompts decoded at once on a CPU: each prompt carries its own (4096, 256) image tokens through the
# decoder, and a few at a time stay in cache (measured on 2 cores: 64 per batch ~66 ms/prompt, 1 ~40 ms).
CPU_DECODE_CHUNK = 1


class Predictor(PredictorBase):
    """Promptable segmentation of one image at a time.

    Coordinate frames: points are (x, y) and boxes XYXY, both in original-image pixels; masks come back at
    the original size (H, W). Low-res logits are (256, 256) in the padded model-input frame and can be fed
    back as `mask_input` on the next call.
    """

    def __init__(self, model: Sam) -> None:
        self.model = model
        self.transform = ImagePipeline.of(model)
        self.mask_input_size = model.prompt_encoder.mask_input_size
        self._upscaler: Upscaler | None = None
        self.reset_image()

    # --- image -----------------------------------------------------------------------------------------

    def reset_image(self) -> None:
        """Forget the current image and its embedding."""
        self.features: torch.Tensor | None = None
        self._image_side: ImageSide | None = None
        self.original_size: tuple[int, int] = (0, 0)
        self.input_size: tuple[int, int] = (0, 0)

    @property
    def is_image_set(self) -> bool:
        return self.features is not None

    @property
    def embedding(self) -> torch.Tensor:
        """The image embedding, (1, 256, 64, 64)."""
        return self._require_image()

    @torch.inference_mode()
    def set_image(self, image: ImageLike) -> None:
        """Encode `image`: an (H, W, 3) uint8 RGB or (H, W) gray array, a PIL image, or a path."""
        arr = load_image(image)
        resized = self.transform.apply_image(arr)
        x = torch.from_numpy(np.array(resized)).to(self.model.device).permute(2, 0, 1).contiguous()[None]
        self.set_torch_image(x, (arr.shape[0], arr.shape[1]))

    @torch.inference_mode()
    def set_torch_image(self, image: torch.Tensor, original_size: tuple[int, int]) -> None:
        """Encode an already resized image: (1, 3, h, w) RGB 0..255, longest side == model.image_size."""
        self.reset_image()
        dtype = next(self.model.image_encoder.parameters()).dtype
        x = self.transform.to_input_torch(image.float()).to(dtype)
        amp = self.model.encoder_amp  # set by samkit.load(..., dtype=...)
        with torch.autocast(self.model.device.type, dtype=amp, enabled=amp is not None):
            features = self.model.image_encoder(x).float()
        self.features = self._finite(features, "image embedding")
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = (int(image.shape[-2]), int(image.shape[-1]))

    def save_embedding(self, path: str | Path) -> None:
        """Write the embedding, the frame sizes needed to map prompts back and the encoder's identity
        (`samkit.embedding_file`)."""
        info = EmbeddingInfo(self.original_size, self.input_size, EncoderId.of(self.model))
        embedding_file.save(path, self._require_image().detach().cpu().numpy(), info)

    def load_embedding(self, path: str | Path) -> None:
        """Load an embedding file made by this model's encoder (same architecture and, where the file
        records it, the same weights); CheckpointError otherwise."""
        feats, info = embedding_file.load(path, EncoderId.of(self.model))
        self.reset_image()
        self.features = torch.from_numpy(feats).to(self.model.device)
        self.original_size = info.original_size
        self.input_size = info.input_size

    # --- prompts ---------------------------------------------------------------------------------------

    def predict_batch(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """B prompts on the current image at once.

        point_coords: (B, N, 2) XY original pixels; point_labels: (B, N) in {1, 0}, or -1 for padding
        so prompts with different point counts can share a batch. A -1 point becomes SAM's "not a point"
        token (the one the reference appends to box-less prompts): its coordinates are ignored, but the
        decoder still attends to it, so results differ slightly from sending the prompt without it.
        boxes: (B, 4) XYXY original pixels. mask_input: (B, 1, 256, 256).
        Returns masks (B, C, H, W), scores (B, C), low-res logits (B, C, 256, 256) as numpy arrays.
        """
        self._require_image()
        coords_t, labels_t, boxes_t, mask_t = self._prompts_to_torch(
            point_coords, point_labels, boxes, mask_input
        )
        low_res, scores = self.decode_low_res(coords_t, labels_t, boxes_t, mask_t, multimask_output)
        logits = low_res.float().cpu().numpy()
        if cpu_tuned(low_res):
            b, c = logits.shape[:2]
            flat = logits.reshape(b * c, *logits.shape[2:])
            full = upscale_logits(flat, self.model.image_size, self.input_size, self.original_size)
            full = full.reshape(b, c, *full.shape[1:])
            masks = full if return_logits else full > self.model.mask_threshold
        else:
            # On the device: upsampled and thresholded there, so only the bool masks cross to the host.
            up = self.model.postprocess_masks(low_res.float(), self.input_size, self.original_size)
            masks = (up if return_logits else up > self.model.mask_threshold).cpu().numpy()
        return masks, scores.float().cpu().numpy(), logits

    def upscaler(self) -> Upscaler:
        """The `Upscaler` from this image's low-res logits to its full size (kept while the sizes last):
        thresholded full-size masks by blocks, for segment-everything's many masks."""
        self._require_image()
        up = self._upscaler
        if up is None or up.key != (self.input_size, self.original_size):
            model = self.model
            low = model.prompt_encoder.mask_input_size[0]
            up = Upscaler(model.image_size, low, self.input_size, self.original_size, device=model.device)
            self._upscaler = up
        return up

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
        masks = self.model.postprocess_masks(low_res, self.input_size, self.original_size)
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
        iou, _, low_res = self.decode_candidates(
            point_coords, point_labels, boxes, mask_input, multimask_output, min_iou=None
        )
        return low_res, iou

    @torch.inference_mode()
    def decode_candidates(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        min_iou: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores of B prompts and the low-res logits of only those worth upsampling.

        Prompts in the model-input frame, as `decode_low_res`. Returns scores (B, C), rows (K,) the
        prompts with some score > min_iou (all B if min_iou is None), and their logits (K, C, 256, 256).
        The mask head (upscaling + hypernetworks) runs only for those K prompts: the automatic
        generator drops the rest anyway. On a CPU the prompts are decoded a few at a time, which keeps
        the per-prompt image tokens in cache and is faster than one large batch.
        """
        features = self._require_image()
        pe, dec = self.model.prompt_encoder, self.model.mask_decoder
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = pe(points, boxes, mask_input)
        side = self._first_block() if mask_input is None and features.shape[0] == 1 else None
        image_pe = pe.get_dense_pe()
        sel = slice(1, None) if multimask_output else slice(0, 1)
        b = sparse.shape[0]
        step = CPU_DECODE_CHUNK if cpu_tuned(features) else b
        ious, rows, logits = [], [], []
        for i in range(0, b, step):
            j = min(b, i + step)
            feats = features if features.shape[0] == 1 else features[i:j]
            dense_ij = dense[i:j] if dense.shape[0] > 1 else dense
            hs, src = dec.attend(feats, image_pe, sparse[i:j], dense_ij, side)
            iou = dec.iou_from(hs)[:, sel]
            ious.append(iou)
            keep = torch.arange(i, j, device=iou.device)
            if min_iou is not None:
                ok = (iou > min_iou).any(1)
                keep, hs, src = keep[ok], hs[ok], src[ok]
                if not len(keep):
                    continue
            rows.append(keep)
            logits.append(dec.masks_from(hs, src)[:, sel])
        iou = self._finite(torch.cat(ious), "predicted IoU")
        if not rows:
            size = pe.mask_input_size
            empty = torch.zeros(0, iou.shape[1], *size, dtype=iou.dtype, device=iou.device)
            return iou, torch.zeros(0, dtype=torch.int64, device=iou.device), empty
        return iou, torch.cat(rows), torch.cat(logits)

    def _first_block(self) -> ImageSide:
        """The decoder's image-only first-block work for the current image, computed once per image."""
        if self._image_side is None:
            pe = self.model.prompt_encoder
            no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
            self._image_side = self.model.mask_decoder.prepare(
                self._require_image(), pe.get_dense_pe(), no_mask
            )
        return self._image_side

    # --- validation ------------------------------------------------------------------------------------

    def _finite(self, values: torch.Tensor, what: str) -> torch.Tensor:
        """`values`, unless they hold NaN or infinity: then the masks would be empty or garbage without a
        word, so raise instead (damaged weights, or an encoder overflowing in reduced precision)."""
        if bool(torch.isfinite(values).all()):
            return values
        from samkit.errors import CheckpointError

        raise CheckpointError(
            f"model {self.model.arch!r} computed a {what} with NaN or infinite values: its weights are "
            "damaged (download or copy them again) or its reduced precision overflows (load it with dtype='fp32')"
        )

    def _require_image(self) -> torch.Tensor:
        if self.features is None:
            raise StateError("no image set: call set_image() (or load_embedding()) before predict()")
        return self.features

    def _prompts_to_torch(
        self,
        coords: np.ndarray | None,
        labels: np.ndarray | None,
        boxes: np.ndarray | None,
        mask_input: np.ndarray | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        device = self.model.device
        coords, labels, boxes, mask_input = check_prompts(
            coords, labels, boxes, mask_input, self.original_size, self.mask_input_size
        )
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
