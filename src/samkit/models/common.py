"""Small building blocks shared by the encoders and the decoder."""

from __future__ import annotations

import torch
from torch import nn


def version_key(t: torch.Tensor) -> tuple | None:
    """A key that changes when `t` is modified in place, for caching what is computed from a parameter.

    None for an inference tensor (e.g. a model loaded under `torch.inference_mode()`): those keep no
    version counter, so nothing computed from them can be cached safely. None while torch.export /
    torch.compile trace the model too: their fake tensors have no storage (and no cache is wanted there).
    """
    if t.is_inference() or torch.compiler.is_compiling():
        return None
    return (t._version, t.data_ptr(), t.device, t.dtype)


def softmax_tokens(scores: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over dim 2 (the prompt tokens) of attention scores (B, ., T, .), into `out` if given.

    Written out because ATen's softmax over a middle dimension of a few tokens is ~30% slower on a CPU;
    each step here runs over the contiguous inner dimension. Used for image->token attention, laid out
    (B, N, T, H) in the plain decoder and (B, H, T, N) in the factored one."""
    weights = (scores - scores.amax(2, keepdim=True)).exp_()
    return torch.div(weights, weights.sum(2, keepdim=True), out=out)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of a (B, C, H, W) tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()  # statistics in fp32 even when the encoder runs in bf16
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return (self.weight[:, None, None].float() * x + self.bias[:, None, None].float()).to(dtype)


class MLPBlock(nn.Module):
    """Two linear layers with an activation between them (transformer feed-forward)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """`num_layers` linear layers with ReLU between them (the decoder's heads)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = torch.relu(x)
        return x
