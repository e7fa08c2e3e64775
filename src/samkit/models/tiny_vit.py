"""TinyViT image encoder as used by MobileSAM (TinyViT-5M, strides changed to give a 64 x 64 embedding).

Input: (B, 3, S, S) normalised image. Output: (B, 256, 64, 64) for S = 1024 (MobileSAM, patch stride 4)
and for S = 256 (LiteMedSAM, patch stride 1).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from samkit.devices import cpu_tuned
from samkit.models.common import LayerNorm2d, version_key

# Rows of a stage-0 map an MBConv block processes at once at inference (of 256 for a 1024 input).
_MBCONV_BAND_ROWS = 32
# Tokens an attention stage's window attention and MLP process at once at fp32 inference on a CPU: their
# intermediates (qkv, scores, the 4x MLP hidden) then stay in cache instead of passing through memory
# (10-15% off the fp32 encoder on one or two threads; under bf16 autocast no faster, slower on two threads).
_TOKEN_CHUNK = 1024


def _gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU (erf form); in place when autograd is off and `x` is a fresh intermediate.

    Writing into `x` skips allocating another activation-sized buffer: the stage-0 maps are 33 MB in bf16,
    and a fresh buffer that size costs more in page faults than the GELU itself.
    """
    return torch.ops.aten.gelu_(x) if not torch.is_grad_enabled() else F.gelu(x)


def _fast_path(x: torch.Tensor, training: bool) -> bool:
    """True for CPU inference (eval mode, no autograd), not while an exporter or compiler traces the
    model: where the banded / chunked forms run (a traced graph keeps whole-map ops, which its runtime
    schedules its own way)."""
    if training or torch.is_grad_enabled() or not cpu_tuned(x):
        return False
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing())


def _chunked(x: torch.Tensor, training: bool) -> bool:
    """Where an attention stage runs a chunk of tokens at a time: fp32 CPU inference (`_fast_path`, no
    autocast)."""
    fp32 = x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type)
    return fp32 and _fast_path(x, training)


def _in_chunks(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    dim: int,
    size: int,
    chunked: bool,
    residual: bool = False,
) -> torch.Tensor:
    """`fn(x)` (plus `x` with `residual`) for a shape-keeping `fn` that treats the entries along `dim`
    independently; with `chunked`, `size` entries at a time into one output (the same numbers; the residual
    is added straight into it)."""
    if not chunked or x.shape[dim] <= size:
        return x + fn(x) if residual else fn(x)
    out = torch.empty_like(x)
    for i in range(0, x.shape[dim], size):
        part = (slice(None),) * dim + (slice(i, i + size),)
        if residual:
            torch.add(x[part], fn(x[part]), out=out[part])
        else:
            out[part] = fn(x[part])
    return out


class Conv2dBN(nn.Sequential):
    """Conv (no bias) followed by BatchNorm; child names `c` and `bn` as in the official checkpoints.

    In eval mode the BatchNorm is folded into the conv's weights on the fly (a few thousand multiplies),
    which saves a full pass over the activations.
    """

    def __init__(
        self, cin: int, cout: int, ks: int = 1, stride: int = 1, pad: int = 0, groups: int = 1
    ) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, ks, stride, pad, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.bn(self.c(x))
        return self.folded()(x)

    def folded(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The conv with the BatchNorm folded in (eval mode), as a function of the input."""
        conv, bn = self.c, self.bn
        gain = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        weight = conv.weight * gain[:, None, None, None]
        bias = bn.bias - bn.running_mean * gain
        return lambda x: F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class PatchEmbed(nn.Module):
    """Stem: (B, 3, S, S) -> (B, C, S/stride, S/stride).

    stride 4: two stride-2 3x3 convs (TinyViT, MobileSAM); stride 1: two 1x1 convs (LiteMedSAM, whose
    256 x 256 input is not downsampled here so that the embedding is still 64 x 64).
    """

    def __init__(self, in_chans: int, embed_dim: int, stride: int = 4) -> None:
        super().__init__()
        if stride not in (1, 4):
            raise ValueError(f"TinyViT patch stride must be 1 or 4, got {stride}")
        ks, step, pad = (3, 2, 1) if stride == 4 else (1, 1, 0)
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, embed_dim // 2, ks, step, pad),
            nn.GELU(),
            Conv2dBN(embed_dim // 2, embed_dim, ks, step, pad),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq[2](_gelu(self.seq[0](x)))


class MBConv(nn.Module):
    """Inverted residual block (1x1 expand, 3x3 depthwise, 1x1 project) on (B, C, H, W)."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden)
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.conv3 = Conv2dBN(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-2]
        if h <= _MBCONV_BAND_ROWS or not _fast_path(x, self.training):
            y = _gelu(self.conv1(x))
            y = _gelu(self.conv2(y))
            return _gelu(self.conv3(y) + x)
        # Inference: a band of rows at a time, so that the expanded activations (4x the channels) stay
        # in cache instead of making several passes through memory; the depthwise conv reads one row
        # of halo on each side. Same result as the whole map.
        conv1, conv2, conv3 = self.conv1.folded(), self.conv2.folded(), self.conv3.folded()
        out = torch.empty_like(x)
        for y0 in range(0, h, _MBCONV_BAND_ROWS):
            y1 = min(h, y0 + _MBCONV_BAND_ROWS)
            a, b = max(0, y0 - 1), min(h, y1 + 1)
            y = _gelu(conv2(_gelu(conv1(x[:, :, a:b]))))[:, :, y0 - a : y1 - a]
            out[:, :, y0:y1] = _gelu(conv3(y) + x[:, :, y0:y1])
        return out


class PatchMerging(nn.Module):
    """Downsampling between stages: tokens (B, H*W, C) or maps (B, C, H, W) -> tokens (B, H'*W', C')."""

    def __init__(self, resolution: int, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            b = x.shape[0]
            x = x.view(b, self.resolution, self.resolution, -1).permute(0, 3, 1, 2)
        x = _gelu(self.conv1(x))
        x = _gelu(self.conv2(x))
        x = self.conv3(x)
        # (B, C, H, W) -> (B, H*W, C); free when x is channels_last, as it is in `TinyViT.forward`.
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


class ConvLayer(nn.Module):
    """Stage 0: MBConv blocks, then patch merging."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class WindowAttention(nn.Module):
    """Attention inside a window with a learned bias per head and per (|dy|, |dx|) offset."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = dim // num_heads
        self.scale = self.key_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        points = list(itertools.product(range(window), range(window)))
        offsets: dict[tuple[int, int], int] = {}
        idxs = []
        for p1 in points:
            for p2 in points:
                off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(off, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        n = len(points)
        self.register_buffer("attention_bias_idxs", torch.tensor(idxs).view(n, n), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C) tokens of one window each -> (B, N, C)."""
        b, n, _ = x.shape
        x = self.norm(x)
        q, k, v = self.qkv(x).view(b, n, self.num_heads, 3 * self.key_dim).split(self.key_dim, dim=3)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn += self._bias().to(q.dtype)  # (heads, N, N) broadcast over windows
        out = torch.softmax(attn, dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))

    def _bias(self) -> torch.Tensor:
        """The (heads, N, N) bias; in eval mode gathered once and reused until the parameter changes."""
        key = version_key(self.attention_biases)
        if self.training or torch.is_grad_enabled() or key is None:
            return self.attention_biases[:, self.attention_bias_idxs]
        if getattr(self, "_bias_key", None) != key:
            self._bias_cache = self.attention_biases[:, self.attention_bias_idxs].detach()
            self._bias_key = key
        return self._bias_cache


class TokenMLP(nn.Module):
    """Pre-norm feed-forward on tokens."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(_gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Window attention, a depthwise 3x3 conv on the token map, then the MLP; tokens (B, H*W, C)."""

    def __init__(self, dim: int, resolution: int, num_heads: int, window: int, mlp_ratio: float) -> None:
        super().__init__()
        self.resolution = resolution
        self.window = window
        self.attn = WindowAttention(dim, num_heads, window)
        self.mlp = TokenMLP(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = w = self.resolution
        b, n, c = x.shape
        ws = self.window
        if h == ws and w == ws:
            y = self._windows(x)
        else:
            y = x.view(b, h, w, c)
            pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
            if pad_b or pad_r:
                y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
            hp, wp = h + pad_b, w + pad_r
            nh, nw = hp // ws, wp // ws
            y = y.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
            y = self._windows(y)
            y = y.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, hp, wp, c)
            y = y[:, :h, :w].reshape(b, n, c)
        x = x + y
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w)).view(b, c, n).transpose(1, 2)
        # The MLP with its residual; at inference a chunk of tokens at a time (same result).
        return _in_chunks(self.mlp, x, 1, _TOKEN_CHUNK, _chunked(x, self.training), residual=True)

    def _windows(self, y: torch.Tensor) -> torch.Tensor:
        """The window attention on (windows, ws * ws, C); at inference a few windows at a time."""
        step = max(1, _TOKEN_CHUNK // y.shape[1])
        return _in_chunks(self.attn, y, 0, step, _chunked(y, self.training))


class BasicLayer(nn.Module):
    """An attention stage: TinyViT blocks, then optional patch merging."""

    def __init__(
        self,
        dim: int,
        resolution: int,
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        downsample: nn.Module | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, resolution, num_heads, window, mlp_ratio) for _ in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """TinyViT with MobileSAM's strides and a SAM neck.

    `patch_stride` 4 is MobileSAM (1024 input), 1 is LiteMedSAM (256 input); both give a 64 x 64 embedding.
    `head`/`norm_head` (unused) exist only when `classifier_head`, so that MobileSAM's checkpoint loads.
    """

    def __init__(
        self,
        img_size: int = 1024,
        in_chans: int = 3,
        embed_dims: tuple[int, ...] = (64, 128, 160, 320),
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (2, 4, 5, 10),
        window_sizes: tuple[int, ...] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        out_chans: int = 256,
        num_classes: int = 1000,
        patch_stride: int = 4,
        classifier_head: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], patch_stride)
        res0 = img_size // patch_stride
        n = len(depths)
        # MobileSAM keeps the last stage at the third stage's resolution, so the embedding is S/16.
        resolutions = [res0 // (2 ** (i - 1 if i == n - 1 else i)) for i in range(n)]
        self.embed_resolution = resolutions[-1]
        self.layers = nn.ModuleList()
        for i in range(n):
            downsample = None
            if i < n - 1:
                out_dim = embed_dims[i + 1]
                stride = 1 if out_dim in (320, 448, 576) else 2
                downsample = PatchMerging(resolutions[i], embed_dims[i], out_dim, stride)
            if i == 0:
                self.layers.append(ConvLayer(embed_dims[0], depths[0], mbconv_expand_ratio, downsample))
            else:
                self.layers.append(
                    BasicLayer(
                        embed_dims[i],
                        resolutions[i],
                        depths[i],
                        num_heads[i],
                        window_sizes[i],
                        mlp_ratio,
                        downsample,
                    )
                )
        if classifier_head:
            self.norm_head = nn.LayerNorm(embed_dims[-1])
            self.head = nn.Linear(embed_dims[-1], num_classes)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, S, S) -> (B, 256, S/16, S/16)."""
        # Channels-last lets the conv stages run without layout reorders between convs and token views.
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        for layer in self.layers:
            x = layer(x)
        b, _, c = x.shape
        r = self.embed_resolution
        return self.neck(x.view(b, r, r, c).permute(0, 3, 1, 2))
