"""TinyViT encoder: the in-place (no autograd) activations give the same result as the autograd path."""

from __future__ import annotations

import torch

from samkit.models.tiny_vit import TinyViT


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
