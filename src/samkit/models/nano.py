"""samkit-nano image encoder: MobileSAM's TinyViT run on a half-size input, with a neck back to 64 x 64.

Input: (B, 3, S, S) normalised, zero-padded model input (S = 1024, the same frame as SAM and MobileSAM, so
prompts, masks and the Predictor are unchanged). The input is resized to `inner` (512) and TinyViT runs
there: every stage sees a quarter of the tokens, so the encoder costs about a quarter of MobileSAM's.
TinyViT's own neck then gives (B, 256, inner/16, inner/16); the nano neck upsamples it bilinearly to
(B, 256, S/16, S/16) and adds a learned correction computed from the upsampled map and the sharper
second-stage tokens (B, C1, inner/8, inner/8). The correction's last conv starts at zero, so an untrained
nano encoder with MobileSAM's weights is exactly "MobileSAM at 512 px, upsampled".
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from samkit.models.tiny_vit import TinyViT


class NanoEncoder(nn.Module):
    """(B, 3, S, S) normalised image -> (B, 256, S/16, S/16) embedding, computed at `inner` px."""

    def __init__(
        self,
        img_size: int = 1024,
        inner: int = 512,
        embed_dims: tuple[int, ...] = (64, 128, 160, 320),
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (2, 4, 5, 10),
        window_sizes: tuple[int, ...] = (7, 7, 14, 7),
        fuse_dim: int = 128,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.inner = inner
        self.embed_resolution = img_size // 16
        self.backbone = TinyViT(
            inner, 3, embed_dims, depths, num_heads, window_sizes, out_chans=out_chans, classifier_head=False
        )
        hi_dim = embed_dims[1]
        self.fuse = nn.Sequential(
            nn.Conv2d(out_chans + hi_dim, fuse_dim, 1),
            nn.GELU(),
            nn.Conv2d(fuse_dim, fuse_dim, 3, padding=1, groups=fuse_dim),
            nn.GELU(),
            nn.Conv2d(fuse_dim, out_chans, 1),
        )
        nn.init.zeros_(self.fuse[-1].weight)
        nn.init.zeros_(self.fuse[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, S, S) -> (B, 256, S/16, S/16)."""
        t = self.backbone
        if x.shape[-1] != self.inner:
            # Antialiased resizing has no bf16 kernel on the CPU; fp32 for this one cheap op.
            size = (self.inner, self.inner)
            x = F.interpolate(x.float(), size=size, mode="bilinear", antialias=True).to(x.dtype)
        y = t.layers[0](t.patch_embed(x.contiguous(memory_format=torch.channels_last)))
        second = t.layers[1]
        for block in second.blocks:
            y = block(y)
        b, n, c = y.shape
        r = int(n**0.5)
        hi = y.view(b, r, r, c).permute(0, 3, 1, 2)  # (B, C1, inner/8, inner/8)
        y = second.downsample(y)
        for layer in t.layers[2:]:
            y = layer(y)
        r = t.embed_resolution
        low = t.neck(y.view(b, r, r, -1).permute(0, 3, 1, 2))  # (B, 256, inner/16, inner/16)
        size = (self.embed_resolution, self.embed_resolution)
        up = F.interpolate(low, size=size, mode="bilinear", align_corners=False)
        if hi.shape[-1] != size[0]:
            hi = F.interpolate(hi, size=size, mode="bilinear", align_corners=False)
        return up + self.fuse(torch.cat([up, hi.to(up.dtype)], 1))


def warm_start(student: nn.Module, teacher: nn.Module) -> int:
    """Copy every teacher tensor into `student` where a tensor of the same role exists; returns how many.

    Names match directly, or with `image_encoder.` mapped to `image_encoder.backbone.` (a TinyViT teacher
    into a NanoEncoder). Window-attention bias tables of another window size are resampled by offset: the
    student's bias for offset (dy, dx) is the teacher's for (min(dy, w-1), min(dx, w-1)).
    """
    src = teacher.state_dict()
    own = student.state_dict()
    out = {}
    for key, value in own.items():
        name = key if key in src else re.sub(r"^image_encoder\.backbone\.", "image_encoder.", key)
        if name not in src:
            continue
        t = src[name]
        if t.shape == value.shape:
            out[key] = t
        elif key.endswith("attention_biases") and t.shape[0] == value.shape[0]:
            out[key] = _resample_biases(t, round(value.shape[1] ** 0.5))
    student.load_state_dict(out, strict=False)
    return len(out)


def _resample_biases(table: torch.Tensor, window: int) -> torch.Tensor:
    """(heads, w*w) bias table indexed by dy * w + dx -> (heads, window * window), offsets clamped."""
    w = round(table.shape[1] ** 0.5)
    idx = torch.arange(window).clamp(max=w - 1)
    grid = table.view(-1, w, w)[:, idx][:, :, idx]
    return grid.reshape(table.shape[0], window * window).clone()
