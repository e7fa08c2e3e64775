"""Low-res logits to the image's full size: the one upsampling implementation every front end uses.

SAM's masks come out as (256, 256) logits in the padded model-input frame. `interpolate_logits` is the
definition (SAM's postprocessing): bilinear (half-pixel) to the model-input square, crop the unpadded
part, bilinear again to the image size. `upscale_logits` gives the same logits in the fastest form for a
tensor's device (OpenCV on a CPU), for the `Predictor`'s few masks per click; the exported ONNX decoder
and `Sam.postprocess_masks` run `interpolate_logits` itself.

Segment-everything never holds full-size logits: `Upscaler` gives thresholded full-size masks, their
pixel counts and boxes. Every output pixel is a convex combination of a few low-res logits (a 2-4 x 2-4
neighbourhood), with separable weights: full = A @ low @ B.T where A is (H, 256) and B is (W, 256). The
image is cut into square blocks of output pixels; a block whose low-res support is entirely above (or
below) a threshold is above (below) it at every pixel, so only blocks that straddle a threshold are
computed exactly, as small (T x K) @ (K x K) @ (K x T) products. For the masks segment-everything
produces this touches a few percent of the pixels.

The values computed here equal `interpolate_logits` up to float rounding (~1e-6 relative), so a pixel can
only come out differently when its logit is within that of a threshold. Low-res logits that reach no
output pixel change nothing, as long as they are finite: they enter no block's range and the exact
products only with weight zero (a masks-only decode leaves the padding's at a large negative value).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from samkit.devices import cpu_tuned

# A block is decided without computing its pixels only when its support clears the threshold by this
# fraction of its largest |logit|: the float32 rounding of the interpolation is below 1e-6 of that.
_REL_TOL = 1e-5


def interpolate_logits(
    low_res: torch.Tensor, model_size: int, input_size: Sequence[Any], original_size: Sequence[Any]
) -> torch.Tensor:
    """Low-res logits (B, C, L, L) in the padded model-input frame -> logits (B, C, H, W) at the original size.

    model_size: the model-input square side S (1024 for SAM); input_size: (h, w) of the resized image
    inside it; original_size: (H, W). Ints, or 0-d tensors in a traced export graph.
    """
    up = F.interpolate(low_res, (model_size, model_size), mode="bilinear", align_corners=False)
    up = up[..., : input_size[0], : input_size[1]]
    return F.interpolate(up, (original_size[0], original_size[1]), mode="bilinear", align_corners=False)


def upscale_logits(
    low_res: torch.Tensor, model_size: int, input_size: tuple[int, int], original_size: tuple[int, int]
) -> torch.Tensor:
    """`interpolate_logits` of (B, C, L, L) logits as float32 (B, C, H, W), on their device.

    On a CPU the two bilinear steps run in OpenCV, one plane at a time (~3x faster than torch there); the
    logits agree with `interpolate_logits` to ~1e-6 relative.
    """
    low_res = low_res.float()
    if not cpu_tuned(low_res):
        return interpolate_logits(low_res, model_size, input_size, original_size)
    import cv2

    planes = low_res.reshape(-1, *low_res.shape[-2:]).numpy()
    out = np.empty((len(planes), original_size[0], original_size[1]), dtype=np.float32)
    big = np.empty((model_size, model_size), dtype=np.float32)
    h, w = input_size
    size = (original_size[1], original_size[0])  # OpenCV sizes are (width, height)
    for plane, dst in zip(planes, out, strict=True):  # no channel transposes, results written in place
        cv2.resize(
            np.ascontiguousarray(plane), (model_size, model_size), dst=big, interpolation=cv2.INTER_LINEAR
        )
        cv2.resize(big[:h, :w], size, dst=dst, interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(out).view(*low_res.shape[:-2], *out.shape[1:])


@dataclass
class BlockMasks:
    """S full-size masks `interpolate_logits(logits) > threshold`, kept as blocks.

    full: bool (S, n_rb, n_cb), blocks wholly inside the mask. exact_index: int64 (M, 3) rows (mask,
    row block, column block) of the blocks computed pixel by pixel; exact_bits: bool (M, T, T) their
    pixels (pixels past the image edge are False), or uint8 (M, T * T / 8) once `packed()`.
    """

    full: torch.Tensor
    exact_index: torch.Tensor
    exact_bits: torch.Tensor

    def __len__(self) -> int:
        return self.full.shape[0]

    def select(self, which: torch.Tensor) -> BlockMasks:
        """The masks `which` (D,) int64, renumbered 0..D-1 in that order."""
        position = torch.full((len(self),), -1, dtype=torch.int64, device=which.device)
        position[which] = torch.arange(len(which), device=which.device)
        new = position[self.exact_index[:, 0]]
        sel = new >= 0
        index = torch.cat([new[sel, None], self.exact_index[sel, 1:]], 1)
        return BlockMasks(self.full[which], index, self.exact_bits[sel])

    @staticmethod
    def cat(parts: Sequence[BlockMasks]) -> BlockMasks:
        """The masks of `parts`, one after the other (all packed or all not)."""
        offsets = np.cumsum([0] + [len(p) for p in parts])
        index = [
            p.exact_index + p.exact_index.new_tensor([int(o), 0, 0])
            for p, o in zip(parts, offsets[:-1], strict=True)
        ]
        return BlockMasks(
            torch.cat([p.full for p in parts]), torch.cat(index), torch.cat([p.exact_bits for p in parts])
        )

    def packed(self) -> BlockMasks:
        """The same masks with the exact blocks' pixels packed 8 per byte (CPU; 8x less memory while
        they wait for NMS); `bits()` unpacks them. Other devices keep bool pixels."""
        if self.exact_bits.dtype != torch.bool or not cpu_tuned(self.exact_bits):
            return self
        bits = _rows(self.exact_bits.numpy())
        return BlockMasks(self.full, self.exact_index, torch.from_numpy(np.packbits(bits, axis=1)))

    def bits(self) -> torch.Tensor:
        """bool (M, T, T): the exact blocks' pixels."""
        if self.exact_bits.dtype == torch.bool:
            return self.exact_bits
        t = math.isqrt(self.exact_bits.shape[1] * 8)
        bits = np.unpackbits(self.exact_bits.numpy(), axis=1).view(np.bool_)
        return torch.from_numpy(bits).view(len(bits), t, t)


class _Axis:
    """The interpolation weights along one axis, cut into blocks of `block` output pixels.

    Each block reads a window of K consecutive low-res positions starting at `start` (K is the widest
    block's support; narrower blocks get a few extra positions, whose weights are zero). `support` is
    the same window with those extra positions replaced by ones of the block's support: the block's
    range (min, max) reads only logits that reach its pixels, so logits that reach no pixel of the
    image (the padding's, which a masks-only decode leaves at `OUTSIDE_REGION`) never decide a block.
    """

    def __init__(self, weights: torch.Tensor, block: int) -> None:
        # weights: (n_out, n_low) float64 with a few contiguous non-zeros per row.
        n_out, n_low = weights.shape
        positions = torch.arange(n_low)
        nonzero = weights != 0
        lo = torch.where(nonzero, positions, n_low).amin(1)
        hi = torch.where(nonzero, positions, -1).amax(1)
        self.n_blocks = -(-n_out // block)
        pad = self.n_blocks * block - n_out
        lo = torch.cat([lo, lo[-1:].expand(pad)]).view(self.n_blocks, block).amin(1)
        hi = torch.cat([hi, hi[-1:].expand(pad)]).view(self.n_blocks, block).amax(1)
        self.k = int((hi - lo).max()) + 1
        self.start = torch.clamp(lo, max=n_low - self.k)  # (n_blocks,)
        window = self.start[:, None] + torch.arange(self.k)  # (n_blocks, K)
        self.support = torch.minimum(torch.maximum(window, lo[:, None]), hi[:, None])
        rows = torch.arange(self.n_blocks * block).view(self.n_blocks, block)
        w = weights[rows.clamp(max=n_out - 1)[:, :, None], window[:, None, :]]  # (n_blocks, T, K)
        # Padding pixels beyond the image get NaN weights: NaN compares False with every threshold.
        w[rows >= n_out] = float("nan")
        self.weights = w.float()
        self.window = window
        self.sizes = torch.clamp(n_out - rows[:, 0], max=block)  # real pixels per block


def _interp_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float64 matrix of `F.interpolate(..., mode="bilinear", align_corners=False)` along
    one axis, read off PyTorch itself so the weights are the ones it uses."""
    eye = torch.eye(n_in, dtype=torch.float32)[None, None]  # rows = input positions
    out = F.interpolate(eye, size=(n_out, n_in), mode="bilinear", align_corners=False)
    return out[0, 0].double()


class Upscaler:
    """Counts and masks of `interpolate_logits(logits) > t` for low-res logits (N, L, L) of one image frame.

    model_size: the model-input square side (1024); input_size: (h, w) of the resized image inside it;
    original_size: (H, W) of the image (or crop) the masks are for. `block` is the side T of the square
    blocks of output pixels.
    """

    def __init__(
        self,
        model_size: int,
        low_res: int,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
        block: int = 32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.key = ((int(input_size[0]), int(input_size[1])), self.original_size)
        self.block = block
        stage1 = _interp_matrix(low_res, model_size)
        rows = _interp_matrix(input_size[0], original_size[0]) @ stage1[: input_size[0]]
        cols = _interp_matrix(input_size[1], original_size[1]) @ stage1[: input_size[1]]
        self.rows = _Axis(rows, block)
        self.cols = _Axis(cols, block)
        self.device = torch.device(device)
        for axis in (self.rows, self.cols):
            axis.start = axis.start.to(self.device)
            axis.window = axis.window.to(self.device)
            axis.support = axis.support.to(self.device)
            axis.weights = axis.weights.to(self.device)
            axis.sizes = axis.sizes.to(self.device)
        self.block_pixels = self.rows.sizes[:, None] * self.cols.sizes[None, :]  # (n_rb, n_cb)

    def _block_range(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Min and max of the low-res logits each block's pixels read: (N, n_rb, n_cb) each."""
        # One whole low-res row (then column) per block and window position, folded in by elementwise
        # min / max: ~3x faster on a CPU than reducing a gathered (N, n_rb, K, L) over its K axis.
        rows, cols = self.rows.support, self.cols.support
        lo = _fold(logits, rows, torch.minimum).transpose(1, 2).contiguous()  # (N, L, n_rb)
        hi = _fold(logits, rows, torch.maximum).transpose(1, 2).contiguous()
        lo, hi = _fold(lo, cols, torch.minimum), _fold(hi, cols, torch.maximum)  # (N, n_cb, n_rb)
        return lo.transpose(1, 2), hi.transpose(1, 2)

    def exact_values(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Full-size logits of the blocks `index` (M, 3) = (mask, row block, column block): (M, T, T).

        Pixels outside the image (in the last row/column of blocks) are NaN.
        """
        n, rb, cb = index.unbind(1)
        rw, cw = self.rows.window, self.cols.window
        patches = logits[n[:, None, None], rw[rb][:, :, None], cw[cb][:, None, :]]  # (M, K, K)
        return torch.bmm(torch.bmm(self.rows.weights[rb], patches), self.cols.weights[cb].transpose(1, 2))

    def count_and_mask(
        self, logits: torch.Tensor, thresholds: Sequence[float], threshold: float
    ) -> tuple[torch.Tensor, BlockMasks]:
        """For logits (N, L, L): int64 (N, n_thresholds) pixels of each full-size mask above each of
        `thresholds`, and the full-size masks `> threshold` as blocks, in one pass (each block's range is
        read once, and a block that straddles several thresholds is computed once). The counts equal
        `(interpolate_logits(logits) > t).sum()` up to pixels within float rounding of a threshold."""
        bmin, bmax = self._block_range(logits)
        tol = _REL_TOL * torch.maximum(torch.maximum(bmin.abs(), bmax.abs()), torch.ones_like(bmin))
        lo, hi = bmin - tol, bmax + tol
        above = [lo > t for t in thresholds]
        counted = torch.zeros_like(lo, dtype=torch.bool)  # blocks whose counts are computed pixel by pixel
        for t, a in zip(thresholds, above, strict=True):
            counted |= ~a & (hi >= t)
        mask_above = lo > threshold
        straddle = ~mask_above & (hi >= threshold)
        index = (counted | straddle).nonzero()
        values = self.exact_values(logits, index)
        n, rb, cb = index.unbind(1)
        counts = torch.stack([((a & ~counted) * self.block_pixels).sum((1, 2)) for a in above], 1)
        if index.shape[0]:
            per_block = torch.stack([_count_true(values > t) for t in thresholds], 1)
            counts.index_add_(0, n, per_block * counted[n, rb, cb][:, None])
        bits = values > threshold
        own = straddle[n, rb, cb]
        if not bool(own.all()):
            index, bits = index[own], bits[own]
        return counts, BlockMasks(mask_above & ~straddle, index, bits)

    def boxes(self, masks: BlockMasks) -> torch.Tensor:
        """int64 (S, 4) XYXY inclusive boxes of the masks; [0, 0, 0, 0] for an empty mask."""
        t = self.block
        h, w = self.original_size
        s, n_rb, n_cb = masks.full.shape
        m, rb, cb = masks.exact_index.unbind(1)
        rows = torch.zeros(s, n_rb, t, dtype=torch.int32, device=masks.full.device)
        cols = torch.zeros(s, n_cb, t, dtype=torch.int32, device=masks.full.device)
        rows += masks.full.any(2)[:, :, None]
        cols += masks.full.any(1)[:, :, None]
        bits = masks.bits()
        rows.index_put_((m, rb), bits.any(2).to(torch.int32), accumulate=True)
        cols.index_put_((m, cb), bits.any(1).to(torch.int32), accumulate=True)
        rows_any = rows.view(s, n_rb * t)[:, :h] > 0
        cols_any = cols.view(s, n_cb * t)[:, :w] > 0
        y0 = rows_any.to(torch.uint8).argmax(1)
        y1 = (h - 1) - rows_any.flip(1).to(torch.uint8).argmax(1)
        x0 = cols_any.to(torch.uint8).argmax(1)
        x1 = (w - 1) - cols_any.flip(1).to(torch.uint8).argmax(1)
        boxes = torch.stack([x0, y0, x1, y1], 1).to(torch.int64)
        return boxes * rows_any.any(1, keepdim=True)

    def areas(self, masks: BlockMasks) -> torch.Tensor:
        """int64 (S,): pixels in each mask."""
        full = (masks.full * self.block_pixels).sum((1, 2)).to(torch.int64)
        if masks.exact_index.shape[0]:
            full.index_add_(0, masks.exact_index[:, 0], masks.bits().flatten(1).sum(1).to(torch.int64))
        return full

    def contains(self, masks: BlockMasks, points: torch.Tensor) -> torch.Tensor:
        """bool (S, P): whether each mask holds the pixel under each of `points` (P, 2) (x, y) pixels of
        this frame (clipped into it)."""
        t = self.block
        h, w = self.original_size
        pts = torch.as_tensor(points, device=masks.full.device).reshape(-1, 2)
        col = pts[:, 0].floor().long().clamp(0, w - 1)
        row = pts[:, 1].floor().long().clamp(0, h - 1)
        rb, cb = row // t, col // t
        inside = masks.full[:, rb, cb].clone()  # (S, P)
        if masks.exact_index.shape[0]:
            lookup = torch.full(masks.full.shape, -1, dtype=torch.int64, device=masks.full.device)
            m, r, c = masks.exact_index.unbind(1)
            lookup[m, r, c] = torch.arange(len(m), device=m.device)
            which = lookup[:, rb, cb]  # (S, P) exact block row or -1
            has = which >= 0
            if bool(has.any()):
                bits = masks.bits()
                s_idx, p_idx = has.nonzero().unbind(1)
                inside[s_idx, p_idx] = bits[which[s_idx, p_idx], row[p_idx] % t, col[p_idx] % t]
        return inside

    def paste(
        self,
        masks: BlockMasks,
        which: torch.Tensor,
        dest: torch.Tensor,
        x0: int = 0,
        y0: int = 0,
        colmajor: bool = False,
    ) -> None:
        """Write masks `which` (D,) into dest (D, H_img, W_img), with this frame's top-left corner at
        (x0, y0); dest must be zeros (bool or uint8). colmajor: dest is (D, W_img, H_img) instead, the
        column-major layout pycocotools encodes (pixel (x, y) of mask d is dest[d, x, y])."""
        t = self.block
        h, w = self.original_size
        d = which.shape[0]
        n_rb, n_cb = self.rows.n_blocks, self.cols.n_blocks
        chosen = masks.select(which)  # renumbered 0..D-1; only their exact blocks get unpacked below
        m, rb, cb = chosen.exact_index.unbind(1)
        bits = chosen.bits().to(dest.dtype)
        device = masks.full.device
        if colmajor:
            local = torch.zeros(d, n_cb * t, n_rb * t, dtype=dest.dtype, device=device)
            # (D, n_cb, n_rb, T cols, T rows)
            blocks = local.view(d, n_cb, t, n_rb, t).permute(0, 1, 3, 2, 4)
            blocks[chosen.full.transpose(1, 2)] = 1
            blocks[m, cb, rb] = bits.transpose(1, 2)
            dest[:, x0 : x0 + w, y0 : y0 + h] = local[:, :w, :h]
        else:
            local = torch.zeros(d, n_rb * t, n_cb * t, dtype=dest.dtype, device=device)
            blocks = local.view(d, n_rb, t, n_cb, t).permute(0, 1, 3, 2, 4)  # (D, n_rb, n_cb, T, T)
            blocks[chosen.full] = 1
            blocks[m, rb, cb] = bits
            dest[:, y0 : y0 + h, x0 : x0 + w] = local[:, :h, :w]


def _fold(x: torch.Tensor, windows: torch.Tensor, op: Callable[..., torch.Tensor]) -> torch.Tensor:
    """`op` (torch.minimum or torch.maximum) of x (N, L, M) over each window of positions along its
    second axis: windows (n, K) int64 -> (N, n, M)."""
    out = x.index_select(1, windows[:, 0])
    for k in range(1, windows.shape[1]):
        op(out, x.index_select(1, windows[:, k]), out=out)
    return out


def _rows(arr: np.ndarray) -> np.ndarray:
    """(M, ...) -> (M, prod(...)); also for M = 0, where reshape(M, -1) is ambiguous (a 1-pixel image)."""
    return arr.reshape(len(arr), math.prod(arr.shape[1:]))


def _count_true(bits: torch.Tensor) -> torch.Tensor:
    """int64 (M,): True entries of bool (M, ...) per row."""
    if cpu_tuned(bits):
        # numpy counts bytes several times faster than torch sums bools on CPU; the memory is shared.
        arr = bits.numpy()
        return torch.from_numpy(_rows(arr).view(np.uint8).sum(1, dtype=np.int64))
    return bits.flatten(1).sum(1)
