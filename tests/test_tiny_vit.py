"""TinyViT encoder: the in-place (no autograd) activations give the same result as the autograd path."""

from __future__ import annotations

import torch

from samkit.models.tiny_vit import MBConv, TinyViT


def test_inference_path_equals_autograd_path_and_leaves_input_alone():
    torch.manual_seed(0)
    model = TinyViT(img_size=256, classifier_head=False).eval()
    x = torch.randn(1, 3, 256, 256)
    before = x.clone()
    with torch.no_grad():
        fast = model(x)
    with torch.enable_grad():
        graph = model(x)
    assert fast.shape == (1, 256, 16, 16)
    assert graph.requires_grad
    torch.testing.assert_close(fast, graph.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x, before, atol=0, rtol=0)


def test_training_backward_reaches_the_stem():
    torch.manual_seed(1)
    model = TinyViT(img_size=256, classifier_head=False).train()
    model(torch.randn(2, 3, 256, 256)).square().mean().backward()
    stem = model.patch_embed.seq[0].c.weight.grad
    assert stem is not None and stem.abs().max() > 0


def test_mbconv_bands_equal_the_whole_map():
    """At inference MBConv runs in bands of rows (a row of halo each side for the depthwise conv): the
    same numbers as the whole map, for a height that leaves a short last band, in fp32 and under bf16."""
    torch.manual_seed(0)
    block = MBConv(16, 4.0).eval()
    for bn in (m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    x = torch.randn(1, 16, 75, 40).contiguous(memory_format=torch.channels_last)
    with torch.enable_grad():
        whole = block(x).detach()  # the autograd path runs the whole map at once
    with torch.no_grad():
        banded = block(x)
    assert banded.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(banded, whole, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.enable_grad():
            whole = block(x.bfloat16()).detach()
        with torch.no_grad():
            banded = block(x.bfloat16())
    torch.testing.assert_close(banded.float(), whole.float(), atol=0, rtol=0)


def test_attention_stage_chunks_equal_the_whole_map(monkeypatch):
    """At inference on a CPU an attention stage runs its window attention a few windows at a time and its
    MLP a chunk of tokens at a time in fp32: the same numbers as the whole map (a resolution that pads the
    windows and leaves short last chunks). Under bf16 autocast (where chunks are no faster) the whole map
    runs at once."""
    from samkit.models import tiny_vit

    torch.manual_seed(0)
    block = tiny_vit.TinyViTBlock(32, resolution=23, num_heads=2, window=7, mlp_ratio=4.0).eval()
    x = torch.randn(1, 23 * 23, 32)
    monkeypatch.setattr(tiny_vit, "_TOKEN_CHUNK", 100)  # 2 windows (49 tokens each) and 100 tokens a chunk
    monkeypatch.setattr(block.attn, "forward", _counting(block.attn.forward, seen := []))
    monkeypatch.setattr(block.mlp, "forward", _counting(block.mlp.forward, mlp_seen := [], dim=1))
    with torch.enable_grad():
        whole = block(x).detach()  # the autograd path runs the whole map at once
    assert seen == [16] and mlp_seen == [529]  # all 16 padded windows (28 x 28), all 23 x 23 tokens
    seen.clear(), mlp_seen.clear()
    with torch.no_grad():
        chunked = block(x)
    assert seen == [2] * 8 and mlp_seen == [100] * 5 + [29]
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    seen.clear(), mlp_seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        block(x)
    assert seen == [16] and mlp_seen == [529]


def _counting(forward, seen: list[int], dim: int = 0):
    """`forward`, recording the size of dimension `dim` of each input in `seen`."""

    def wrapped(y):
        seen.append(y.shape[dim])
        return forward(y)

    return wrapped


def test_traced_graph_keeps_whole_map_ops(monkeypatch):
    """While torch.export traces the encoder (the ONNX export's exporter) the chunked forms stay off: the
    graph holds one window attention and one MLP per block, not a loop unrolled over chunks."""
    from samkit.models import tiny_vit

    torch.manual_seed(0)
    block = tiny_vit.TinyViTBlock(32, resolution=23, num_heads=2, window=7, mlp_ratio=4.0).eval()
    monkeypatch.setattr(tiny_vit, "_TOKEN_CHUNK", 100)
    monkeypatch.setattr(block.attn, "forward", _counting(block.attn.forward, seen := []))
    x = torch.randn(1, 23 * 23, 32)
    with torch.no_grad():
        program = torch.export.export(block, (x,))
    assert seen == [16]
    torch.testing.assert_close(program.module()(x), block(x), atol=1e-5, rtol=1e-5)
