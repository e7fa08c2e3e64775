"""SAM's ViT image encoder (MAE-style ViT-B/L/H with windowed and global attention).

Input: (B, 3, 1024, 1024) normalised image. Output: (B, 256, 64, 64) image embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from samkit.models.common import LayerNorm2d, MLPBlock


class ImageEncoderViT(nn.Module):
    """A plain ViT backbone with a convolutional neck.

    Blocks whose index is in `global_attn_indexes` attend over the whole 64 x 64 token grid; the others attend
    inside non-overlapping `window_size` x `window_size` windows (the grid is padded to a multiple of it).
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, S, S) -> (B, 256, S/16, S/16)."""
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: (B, 3, H, W) -> (B, H/p, W/p, C)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Block(nn.Module):
    """Pre-norm transformer block with windowed (window_size > 0) or global attention."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, window_size: int, input_size: tuple[int, int]
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        attn_size = (window_size, window_size) if window_size > 0 else input_size
        self.attn = Attention(dim, num_heads, attn_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), nn.GELU)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, padded = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(x), self.window_size, padded, (h, w))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self._mlp(self.norm2(x))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP; without autograd its GELU runs in place on the hidden activations, which saves a fresh
        4096 x 3072 buffer and its page faults (whole vit_b encoder, 2 cores: 0.97x fp32, 0.99x bf16)."""
        if torch.is_grad_enabled():
            return self.mlp(x)
        return self.mlp.lin2(torch.ops.aten.gelu_(self.mlp.lin1(x)))


class Attention(nn.Module):
    """Multi-head attention over a (B, H, W, C) grid with decomposed relative-position bias.

    The bias for query (i, j) and key (k, l) is q . Rh[i, k] + q . Rw[j, l]. On a CPU the logits are
    computed for one small block of (head, query rows) at a time, with the bias as the added term of the
    matrix product, so global attention never holds the full (N x N) logits of every head at once (the
    reference holds them, plus two copies while adding the bias).
    """

    # Block sizes for the CPU path, measured on 2 cores (benchmarks/bench_attention.py, vit_b at 1024):
    # about `block_queries` query positions of one head per block (global attention: 8 rows x 64
    # columns, ~1.4x faster than 2 rows of all 12 heads at once), and windowed attention in whole
    # windows, batched so a block holds about `block_logits` logits (27 windows x heads of 14 x 14:
    # 1.2x faster in fp32 and 2x in bf16 than row blocks).
    block_queries = 512
    block_logits = 1 << 20
    # In bf16/fp16, small grids (windowed attention: 14 + 14 bias terms per query vs head dim 64) fold the
    # bias into the product instead (`_folded`): 0.6x the blocked core's time on vit_b's windows, 0.96x the
    # whole bf16 encoder. In fp32 the whole encoder gained nothing measurable (1.01x), so it keeps `_blocked`.
    # Global attention (64 + 64 terms) would double the product's depth, which costs more than it saves.
    fold_max_extra = 0.5

    def __init__(self, dim: int, num_heads: int, input_size: tuple[int, int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)  # each (B*heads, N, head_dim)
        rh = get_rel_pos(h, h, self.rel_pos_h).to(q.dtype)  # (H, H, C)
        rw = get_rel_pos(w, w, self.rel_pos_w).to(q.dtype)  # (W, W, C)
        if q.is_cuda:
            out = self._fused(q, k, v, rh, rw, h, w)
        elif q.dtype != torch.float32 and h + w <= self.fold_max_extra * q.shape[-1]:
            out = self._folded(q, k, v, rh, rw, h, w)
        else:
            out = self._blocked(q, k, v, rh, rw, h, w)
        out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)

    def _fused(self, q, k, v, rh, rw, h: int, w: int) -> torch.Tensor:
        """GPU: the bias as an additive mask to the fused (memory-efficient) attention kernel."""
        rel_h, rel_w = _rel_terms(q, rh, rw, h, w)
        bias = (rel_h[..., None] + rel_w[..., None, :]).reshape(q.shape[0], 1, h * w, h * w)
        out = F.scaled_dot_product_attention(
            q[:, None], k[:, None], v[:, None], attn_mask=bias, scale=self.scale
        )
        return out[:, 0]

    def _blocked(self, q, k, v, rh, rw, h: int, w: int) -> torch.Tensor:
        """CPU: q, k, v (B*heads, H*W, C) -> (B*heads, H*W, C), one block of heads x query rows at a time.

        Each block's logits are `baddbmm(bias, q * scale, k^T)` with the block's bias broadcast from the
        two small per-axis terms, then an (out-of-place, per-row cache-resident) softmax and a product
        with v. Every step is an ordinary differentiable op, so the encoder trains through it.
        """
        bh, n, _ = q.shape
        rel_h, rel_w = _rel_terms(q, rh, rw, h, w)
        qs = q * self.scale
        kt = k.transpose(1, 2).contiguous()  # (B*heads, C, N): one copy per layer, not one per block
        rows = max(1, min(h, self.block_queries // w))
        batch = max(1, min(bh, self.block_logits // (rows * w * n)))
        blocks = []
        for b0 in range(0, bh, batch):
            b1 = min(bh, b0 + batch)
            row_blocks = []
            for r0 in range(0, h, rows):
                r1 = min(h, r0 + rows)
                bias = rel_h[b0:b1, r0:r1, :, :, None] + rel_w[b0:b1, r0:r1, :, None, :]
                logits = torch.baddbmm(
                    bias.reshape(b1 - b0, (r1 - r0) * w, n), qs[b0:b1, r0 * w : r1 * w], kt[b0:b1]
                )
                row_blocks.append(torch.softmax(logits, -1) @ v[b0:b1])
            blocks.append(torch.cat(row_blocks, 1) if len(row_blocks) > 1 else row_blocks[0])
        return torch.cat(blocks, 0) if len(blocks) > 1 else blocks[0]

    def _folded(self, q, k, v, rh, rw, h: int, w: int) -> torch.Tensor:
        """CPU, small grids: q, k, v (B*heads, H*W, C) -> (B*heads, H*W, C) with the bias inside the product.

        The bias of query (i, j) for key (a, b) is rel_h[i, j, a] + rel_w[i, j, b], which is the dot product
        of [rel_h, rel_w] with the key's one-hot row and column indicator. Appending those H + W columns to
        q (after q * scale) and the indicators to k gives every logit, bias included, from one batched
        product; no broadcast add over the (N x N) logits and no bias copy (both slow for 14-wide rows).
        Batches of whole grids hold about `block_logits` logits.
        """
        bh, n, _ = q.shape
        rel_h, rel_w = _rel_terms(q, rh, rw, h, w)
        rel_h, rel_w = rel_h.reshape(bh, n, h), rel_w.reshape(bh, n, w)
        qa = torch.cat([q * self.scale, rel_h.to(q.dtype), rel_w.to(q.dtype)], -1)  # (B*heads, N, C+H+W)
        index = torch.arange(n, device=q.device)
        indicator = torch.zeros(h + w, n, dtype=k.dtype, device=k.device)
        indicator[index // w, index] = 1
        indicator[h + index % w, index] = 1
        kat = torch.cat([k.transpose(1, 2), indicator.expand(bh, h + w, n)], 1)  # (B*heads, C+H+W, N)
        batch = max(1, min(bh, self.block_logits // (n * n)))
        blocks = [
            torch.softmax(torch.bmm(qa[b0 : b0 + batch], kat[b0 : b0 + batch]), -1) @ v[b0 : b0 + batch]
            for b0 in range(0, bh, batch)
        ]
        return torch.cat(blocks, 0) if len(blocks) > 1 else blocks[0]


def _rel_terms(
    q: torch.Tensor, rh: torch.Tensor, rw: torch.Tensor, h: int, w: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two per-axis parts of the decomposed bias for q (B*heads, H*W, C): rel_h (B*heads, H, W, H),
    query (i, j) against key row k, and rel_w (B*heads, H, W, W), query (i, j) against key column l."""
    rq = q.reshape(q.shape[0], h, w, q.shape[-1])
    return torch.einsum("bhwc,hkc->bhwk", rq, rh), torch.einsum("bhwc,wkc->bhwk", rq, rw)


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings (q_size, k_size, C), resizing the table linearly if its length differs."""
    max_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_dist:
        resized = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_dist, mode="linear"
        )
        rel_pos = resized.reshape(-1, max_dist).permute(1, 0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nWindows, window, window, C), padding H and W up to multiples of `window`."""
    b, h, w, c = x.shape
    pad_h = (window - h % window) % window
    pad_w = (window - w % window) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c), (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Inverse of `window_partition`: (B * nWindows, window, window, C) -> (B, H, W, C)."""
    hp, wp = padded
    h, w = size
    b = windows.shape[0] // (hp * wp // window // window)
    x = windows.view(b, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :].contiguous() if (hp > h or wp > w) else x
