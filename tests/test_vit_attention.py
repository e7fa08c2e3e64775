"""The ViT encoder's blocked CPU attention vs a plain full-logits attention with decomposed rel-pos bias."""

from __future__ import annotations

import pytest
import torch

from samkit.models.vit import Attention, get_rel_pos


def _full_attention(q, k, v, rel_pos_h, rel_pos_w, h, w, scale):
    """softmax(scale q k^T + bias) v with all logits at once; bias[(i, j), (a, b)] = q.Rh[i, a] + q.Rw[j, b]."""
    bh, n, c = q.shape
    rh = get_rel_pos(h, h, rel_pos_h)  # (H, H, C)
    rw = get_rel_pos(w, w, rel_pos_w)  # (W, W, C)
    grid = q.reshape(bh, h, w, c)
    bias_h = (grid[:, :, :, None, :] * rh[None, :, None, :, :]).sum(-1)  # (B, H, W, H)
    bias_w = (grid[:, :, :, None, :] * rw[None, None, :, :, :]).sum(-1)  # (B, H, W, W)
    bias = (bias_h[..., None] + bias_w[..., None, :]).reshape(bh, n, n)
    logits = scale * q @ k.transpose(1, 2) + bias
    return torch.softmax(logits, -1) @ v


def _attention(h: int, w: int, heads: int, dim: int, block_queries: int, block_logits: int) -> Attention:
    torch.manual_seed(0)
    attn = Attention(dim, heads, (h, w))
    with torch.no_grad():
        attn.rel_pos_h.normal_(0, 0.5)
        attn.rel_pos_w.normal_(0, 0.5)
    attn.block_queries = block_queries
    attn.block_logits = block_logits
    return attn


# (grid h, w, batch*heads, block_queries, block_logits): one block; several row blocks of one head
# (global-attention style, last block partial); several whole-window batches (windowed style, last partial).
CASES = {
    "one_block": (6, 5, 3, 1000, 1 << 20),
    "row_blocks": (7, 6, 4, 12, 1 << 20),
    "window_batches": (5, 5, 7, 1000, 2 * 25 * 25),
}


@pytest.mark.parametrize("case", list(CASES))
def test_blocked_matches_full_attention(case):
    h, w, bh, block_queries, block_logits = CASES[case]
    attn = _attention(h, w, heads=1, dim=16, block_queries=block_queries, block_logits=block_logits)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(bh, h * w, 16, generator=g) for _ in range(3))
    rh = get_rel_pos(h, h, attn.rel_pos_h)
    rw = get_rel_pos(w, w, attn.rel_pos_w)
    with torch.no_grad():
        ours = attn._blocked(q, k, v, rh, rw, h, w)
        full = _full_attention(q, k, v, attn.rel_pos_h, attn.rel_pos_w, h, w, attn.scale)
    assert ours.shape == (bh, h * w, 16)
    torch.testing.assert_close(ours, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_blocked_gradients_match_full_attention(case):
    h, w, bh, block_queries, block_logits = CASES[case]
    attn = _attention(h, w, heads=1, dim=16, block_queries=block_queries, block_logits=block_logits)
    _assert_gradients_match_full_attention(attn, attn._blocked, h, w, bh, seed=2)


def _assert_gradients_match_full_attention(attn: Attention, path, h: int, w: int, bh: int, seed: int):
    """`path` (attn._blocked or attn._folded) on random q, k, v (B*heads, H*W, 16): its gradients w.r.t.
    q, k, v and both rel-pos tables, for a random weighting of the output, equal full attention's and are
    not all zero. Returns (its output, full attention's output)."""
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(bh, h * w, 16, generator=g, requires_grad=True) for _ in range(3)]
    weight = torch.randn(bh, h * w, 16, generator=g)
    params = [attn.rel_pos_h, attn.rel_pos_w]
    rh = get_rel_pos(h, h, attn.rel_pos_h)
    rw = get_rel_pos(w, w, attn.rel_pos_w)
    out = path(*inputs, rh, rw, h, w)
    full_out = _full_attention(*inputs, attn.rel_pos_h, attn.rel_pos_w, h, w, attn.scale)
    ours = torch.autograd.grad((out * weight).sum(), inputs + params)
    full = torch.autograd.grad((full_out * weight).sum(), inputs + params)
    for name, a, b in zip(["q", "k", "v", "rel_pos_h", "rel_pos_w"], ours, full, strict=True):
        assert a.abs().max() > 0, name
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    return out, full_out


def test_module_cpu_path_equals_fused_path():
    """The whole Attention module (qkv, heads, projection) on the CPU path vs its GPU-path formulation."""
    attn = _attention(6, 6, heads=2, dim=16, block_queries=12, block_logits=1 << 20)
    x = torch.randn(2, 6, 6, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = attn(x)
        b, h, w, _ = x.shape
        qkv = attn.qkv(x).reshape(b, h * w, 3, 2, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * 2, h * w, -1).unbind(0)
        rh = get_rel_pos(h, h, attn.rel_pos_h)
        rw = get_rel_pos(w, w, attn.rel_pos_w)
        fused = attn._fused(q, k, v, rh, rw, h, w)
        fused = attn.proj(fused.view(b, 2, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1))
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, fused, atol=1e-5, rtol=0)


def test_bf16_autocast_close_to_fp32():
    attn = _attention(8, 8, heads=2, dim=32, block_queries=16, block_logits=1 << 20)
    x = torch.randn(1, 8, 8, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fp32 = attn(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = attn(x)
    assert bf16.dtype == torch.bfloat16
    assert torch.isfinite(bf16.float()).all()
    torch.testing.assert_close(bf16.float(), fp32, atol=5e-2, rtol=5e-2)


# (grid h, w, batch*heads, block_logits): one batch; several batches of whole grids, the last one partial.
FOLDED_CASES = {"one_batch": (4, 3, 3, 1 << 20), "grid_batches": (4, 4, 7, 2 * 16 * 16)}


@pytest.mark.parametrize("case", list(FOLDED_CASES))
def test_folded_matches_full_attention_with_gradients(case):
    """The bias-in-the-product path (bf16 windowed layers) is the same attention, values and gradients."""
    h, w, bh, block_logits = FOLDED_CASES[case]
    attn = _attention(h, w, heads=1, dim=16, block_queries=1000, block_logits=block_logits)
    out, full_out = _assert_gradients_match_full_attention(attn, attn._folded, h, w, bh, seed=5)
    torch.testing.assert_close(out.detach(), full_out.detach(), atol=1e-5, rtol=0)


def test_bf16_small_grid_uses_folded_path_and_matches_fp32(monkeypatch):
    """Under bf16 autocast a small grid takes `_folded` (fp32 keeps `_blocked`); both stay close to fp32."""
    attn = _attention(4, 4, heads=1, dim=16, block_queries=1000, block_logits=1 << 20)
    x = torch.randn(2, 4, 4, 16, generator=torch.Generator().manual_seed(6))
    calls = []
    folded = Attention._folded
    monkeypatch.setattr(Attention, "_folded", lambda self, *a: calls.append(a[0].dtype) or folded(self, *a))
    with torch.no_grad():
        fp32 = attn(x)
        assert calls == []
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = attn(x)
    assert calls == [torch.bfloat16]
    torch.testing.assert_close(bf16.float(), fp32, atol=5e-2, rtol=5e-2)


def test_block_inference_mlp_equals_training_mlp():
    """Without autograd the block's MLP runs GELU in place; the result is the same as the module's."""
    from samkit.models.vit import Block

    torch.manual_seed(7)
    block = Block(dim=32, num_heads=2, mlp_ratio=2.0, window_size=0, input_size=(4, 4)).eval()
    x = torch.randn(1, 4, 4, 32)
    with torch.no_grad():
        hidden = block.norm2(x)
        torch.testing.assert_close(block._mlp(hidden), block.mlp(hidden), atol=0, rtol=0)
    assert block(x.requires_grad_()).requires_grad  # the autograd path still builds a graph
