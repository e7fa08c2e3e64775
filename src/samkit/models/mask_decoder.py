"""SAM's mask decoder: image embedding + prompt tokens -> low-res mask logits and predicted IoU."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from samkit.devices import cpu_tuned
from samkit.models.common import MLP, LayerNorm2d
from samkit.models.factored import FactoredKeys, factor_image, factored_attend, supported_shape
from samkit.models.transformer import ImageSide, TwoWayTransformer

# Rows of image tokens upscaled at once by `MaskDecoder.masks_from` at inference (16 of 64: ~2 MB of
# activations per band).
_BAND_ROWS = 16
# The low-res logit given outside `masks_from`'s region: far below any threshold, finite (safe to interpolate).
OUTSIDE_REGION = -1.0e4


class MaskDecoder(nn.Module):
    """Predicts 1 + `num_multimask_outputs` masks per prompt; the first is the single-mask output."""

    def __init__(
        self,
        transformer_dim: int = 256,
        transformer: nn.Module | None = None,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = (
            transformer if transformer is not None else TwoWayTransformer(embedding_dim=transformer_dim)
        )
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )
        # Precision of inference calls (no autograd): None runs the weights as stored; `samkit.load` sets
        # torch.bfloat16 where the hardware multiplies bf16 natively. The weights stay as stored (fp32
        # for saving, training and export); inference runs a cast copy (`_cast_copy`).
        self.inference_dtype: torch.dtype | None = None
        self._cast_cache: tuple[tuple, MaskDecoder] | None = None

    def forward(
        self,
        image_embeddings: torch.Tensor | None,
        image_pe: torch.Tensor | None,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor | None,
        multimask_output: bool,
        image_side: ImageSide | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embeddings: (1 or B, C, 64, 64); sparse: (B, N, C); dense: (B, C, 64, 64).

        image_side: `prepare()`'s result for this image when the prompts carry no mask input (then the
        embedding, PE and dense embedding are not used). Returns logits (B, 3 or 1, 256, 256) and
        predicted IoU (B, 3 or 1).
        """
        masks, iou = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, image_side
        )
        sel = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sel], iou[:, sel]

    @torch.no_grad()
    def prepare(
        self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, no_mask: torch.Tensor
    ) -> ImageSide:
        """The image-only part of the first two-way block for a (1, C, H, W) embedding, to reuse for
        every prompt without a mask input. no_mask: the prompt encoder's no-mask dense embedding
        (1 or C values broadcast over H x W). On a CPU in fp32 it carries the factored form's per-image
        products too (`attend(factored=True)`)."""
        run, dtype = self._runner()
        side = run.transformer.image_side(*_cast(dtype, image_embeddings + no_mask, image_pe))
        if not run._factors(side.keys):
            return side
        conv = run.output_upscaling[0]
        rows, _ = _conv2x2_rows(conv.weight, conv.bias)
        return side._replace(factored=factor_image(run.transformer, side.keys, side.key_pe, rows, side.i2t_q))

    def _factors(self, x: torch.Tensor) -> bool:
        """Whether the factored form runs for image tokens `x`: fp32 inference on a CPU (where fewer
        multiply-adds pay; a GPU is bound by the number of kernels), SAM's decoder shape."""
        return (
            x.dtype == torch.float32
            and cpu_tuned(x)
            and not (torch.is_grad_enabled() or torch.jit.is_tracing())
            and supported_shape(self.transformer)
        )

    def predict_masks(
        self,
        image_embeddings: torch.Tensor | None,
        image_pe: torch.Tensor | None,
        sparse: torch.Tensor,
        dense: torch.Tensor | None,
        image_side: ImageSide | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All 4 mask logits (B, 4, 256, 256) and IoU predictions (B, 4)."""
        hs, src = self.attend(image_embeddings, image_pe, sparse, dense, image_side)
        return self.masks_from(hs, src), self.iou_from(hs)

    def attend(
        self,
        image_embeddings: torch.Tensor | None,
        image_pe: torch.Tensor | None,
        sparse: torch.Tensor,
        dense: torch.Tensor | None,
        image_side: ImageSide | None = None,
        factored: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | FactoredKeys]:
        """The two-way transformer: the IoU and mask tokens (B, 1 + 4, C) and image tokens (B, H*W, C)
        (in `inference_dtype` when that is set).

        factored: return the image tokens as `FactoredKeys` (for `masks_from`) where the factored form
        runs (`image_side` from `prepare` with its per-image products, fp32 inference on a CPU): the
        same numbers up to float rounding, in fewer multiply-adds."""
        run, dtype = self._runner()
        image_embeddings, image_pe, sparse, dense = _cast(dtype, image_embeddings, image_pe, sparse, dense)
        if image_side is not None and image_side.keys.dtype != dtype:  # prepared in another precision
            image_side = ImageSide(*_cast(dtype, *image_side[:5]))
        b = sparse.shape[0]
        keep = 1 + self.num_mask_tokens
        out_tokens = torch.cat([run.iou_token.weight, run.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)
        if image_side is not None:
            if factored and image_side.factored is not None and run._factors(tokens):
                return factored_attend(run.transformer, image_side.factored, image_side, tokens, keep)
            return run.transformer(None, None, tokens, image_side, keep)
        if image_embeddings.shape[0] == 1 and dense.shape[0] > 1 and dense.stride(0) == 0:
            # One image, B prompts, no mask prompt: the dense embedding is one vector broadcast over the
            # batch, so the image side of the first two-way block is the same for every prompt. Keep it
            # at batch 1; attention broadcasts it, and the first image update makes it batch B.
            dense = dense[:1]
        return run.transformer(image_embeddings + dense, image_pe, tokens, keep=keep)

    def iou_from(self, hs: torch.Tensor) -> torch.Tensor:
        """Predicted IoU (B, 4) of the 4 masks from the transformer's output tokens.

        Always in the stored weights' precision: one small MLP on one token, cheap in fp32."""
        return self.iou_prediction_head(hs[:, 0].to(self.iou_token.weight.dtype))

    def masks_from(
        self,
        hs: torch.Tensor,
        src: torch.Tensor | FactoredKeys,
        region: tuple[int, int] | None = None,
        outputs: slice = slice(None),
    ) -> torch.Tensor:
        """Mask logits (B, 4, 4h, 4w) from output tokens hs (B, T, C) and image tokens src (B, h*w, C)
        or `attend(factored=True)`'s `FactoredKeys`.

        The two stride-2 transposed convolutions of `output_upscaling` run as per-pixel matrix
        products in pixel-major order (no layout changes between them); one permute of the 4 output
        maps at the end puts the pixels in place. Same weights, same result as the convolutions.
        At inference on a CPU the embedding is upscaled a few rows at a time: each band's intermediate
        activations then stay in cache (~25% faster, bit-identical); a GPU takes it whole.
        With `inference_dtype` set the upscaling runs in it; the logits come back in fp32.
        region: (rows, cols) of image tokens from the top-left to upscale; logits outside them are not
        computed and read OUTSIDE_REGION. Each token's 4 x 4 logits depend on that token alone, so the
        region's logits are the same as in the full map; callers that only need the masks inside the
        image (not its padding) use it to skip the padded tokens.
        outputs: which of the 4 masks to compute (slice(1, None): the 3 multimask outputs); the result then
        holds only those.
        """
        run, dtype = self._runner()
        if isinstance(src, FactoredKeys):
            b, n = src.alpha.shape
        else:
            hs, src = _cast(dtype, hs, src)
            b, n, c = src.shape
        h = w = math.isqrt(int(n))
        if region is None or tuple(region) == (h, w):
            return run._masks(hs, src, outputs=outputs).float()
        rows, cols = region
        if isinstance(src, FactoredKeys):
            part = src.crop(h, w, rows, cols)
        else:
            part = src.view(b, h, w, c)[:, :rows, :cols].reshape(b, rows * cols, c)
        inner = run._masks(hs, part, cols, outputs).float()
        out = torch.full((b, inner.shape[1], 4 * h, 4 * w), OUTSIDE_REGION, device=inner.device)
        out[:, :, : 4 * rows, : 4 * cols] = inner
        return out

    def _masks(
        self,
        hs: torch.Tensor,
        src: torch.Tensor | FactoredKeys,
        w: int | None = None,
        outputs: slice = slice(None),
    ) -> torch.Tensor:
        conv1, _, _, conv2, _ = self.output_upscaling
        rows1, bias1 = _conv2x2_rows(conv1.weight, conv1.bias)
        if isinstance(src, FactoredKeys):
            (b, n), device = src.alpha.shape, src.alpha.device
            first = src.linear_rows(rows1, bias1)
        else:
            (b, n, _), device = src.shape, src.device

            def first(i0: int, i1: int) -> torch.Tensor:
                return F.linear(src[:, i0:i1].reshape(-1, src.shape[-1]), rows1, bias1)

        if w is None:
            w = math.isqrt(int(n))  # SAM's embeddings are square
        h = n // w
        mask_out = hs[:, 1 : 1 + self.num_mask_tokens]
        mlps = list(enumerate(self.output_hypernetworks_mlps))[outputs]
        hyper = torch.stack([mlp(mask_out[:, i]) for i, mlp in mlps], dim=1)
        rows2, bias2 = _conv2x2_rows(conv2.weight, conv2.bias)
        inference = not (torch.is_grad_enabled() or torch.jit.is_tracing())
        band = _BAND_ROWS if inference and cpu_tuned(device) else h
        k = hyper.shape[1]
        if band >= h:
            return self._mask_band(hyper, first(0, n), b, w, rows2, bias2).reshape(b, k, 4 * h, 4 * w)
        out = torch.empty(b, k, 4 * h, 4 * w, dtype=hyper.dtype, device=hyper.device)
        for y0 in range(0, h, band):
            y1 = min(h, y0 + band)
            rows = out[:, :, 4 * y0 : 4 * y1].view(b, k, y1 - y0, 2, 2, w, 2, 2)
            rows.copy_(self._mask_band(hyper, first(y0 * w, y1 * w), b, w, rows2, bias2))
        return out

    def _mask_band(
        self, hyper: torch.Tensor, x: torch.Tensor, b: int, w: int, rows2: torch.Tensor, bias2: torch.Tensor
    ) -> torch.Tensor:
        """Mask logits (B, K, r, 2, 2, w, 2, 2) of r rows of image tokens from the first transposed
        convolution's output x (B, r*w, 4 C/4) (any shape with those elements): output pixel
        (4y + 2i + k, 4x + 2j + l) at [:, :, y, i, k, x, j, l]. hyper: (B, K, C/8); rows2, bias2: the second
        transposed convolution's `_conv2x2_rows`."""
        n = x.numel() // (b * rows2.shape[1] * 4)
        r = n // w
        _, norm, act1, _, act2 = self.output_upscaling
        x = x.reshape(b * n * 4, -1)  # (b*n*4, c/4)
        dtype = x.dtype
        width = (self.transformer_dim // 4,)  # a Python int, so ONNX tracing sees a constant
        x = F.layer_norm(x.float(), width, norm.weight.float(), norm.bias.float(), norm.eps)
        x = F.linear(act1(x.to(dtype)), rows2, bias2)  # (b*n*4, 4 * c/8)
        x = act2(x).view(b, n * 16, -1)
        masks = hyper @ x.transpose(1, 2)  # (b, K, n*16), pixels ordered (y, x, i, j, k, l)
        return masks.view(b, -1, r, w, 2, 2, 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7)

    def _runner(self) -> tuple[MaskDecoder, torch.dtype]:
        """The decoder to run this call with (itself, or its `_cast_copy`) and that decoder's dtype."""
        low = self._cast_copy()
        run = self if low is None else low
        return run, run.iou_token.weight.dtype

    def _cast_copy(self) -> MaskDecoder | None:
        """The copy of this decoder in `inference_dtype` for an inference call, or None to run this one.

        Made on first use and made again whenever a weight changes (in place, replaced or moved), so it
        never runs stale weights; decoding threads may race to make it, which only costs a copy.
        """
        dtype = self.inference_dtype
        if dtype is None or torch.is_grad_enabled() or torch.jit.is_tracing():
            return None
        tensors = _tensors(self)
        if all(t.dtype == dtype for t in tensors):
            return None
        key = (dtype, *((t.data_ptr(), _version(t)) for t in tensors))
        cached = self._cast_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        self._cast_cache = None  # not copied along
        low = copy.deepcopy(self).to(dtype).requires_grad_(False)
        low.inference_dtype, low._cast_cache = None, None  # (another thread may have set the cache meanwhile)
        self._cast_cache = (key, low)
        return low


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of `module` and its submodules (a shared one more than once): what
    `parameters()` and `buffers()` give, read straight from the modules' own dicts, several times faster
    (`_cast_copy` checks them on every decoder call, and a CPU decodes one prompt per call)."""
    out: list[torch.Tensor] = []
    stack = [module]
    while stack:
        m = stack.pop()
        out.extend(t for t in m._parameters.values() if t is not None)
        out.extend(t for t in m._buffers.values() if t is not None)
        stack.extend(c for c in m._modules.values() if c is not None)
    return out


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor (made under torch.inference_mode) keeps no version
        return -1


def _cast(dtype: torch.dtype, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _conv2x2_rows(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A kernel-2, stride-2 transposed convolution as one linear map per pixel: (rows (4 * Cout, Cin),
    bias (4 * Cout,)), so `F.linear(x, rows, bias)` on pixels x (P, Cin) viewed as (P * 4, Cout) has row
    4p + 2i + j = pixel p's contribution at offset (i, j) of its 2x2 output block.

    weight: (Cin, Cout, 2, 2) as in nn.ConvTranspose2d.
    """
    cin, cout = weight.shape[:2]
    rows = weight.permute(2, 3, 1, 0).reshape(4 * cout, cin)  # output features ordered (i, j, cout)
    return rows, bias.repeat(4)
