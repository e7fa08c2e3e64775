"""The mask decoder's faster inference forms against its plain computation, and which precision
`samkit.load` gives the decoder on each kind of CPU (described, so every branch runs on any machine)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import samkit
from samkit import hardware
from samkit.hardware import CpuInfo
from samkit.models.mask_decoder import MaskDecoder
from samkit.models.transformer import TwoWayTransformer

pytestmark = pytest.mark.usefixtures("one_thread")

AVX2 = CpuInfo("AMD EPYC 7B12", frozenset({"avx2"}), torch_capability="AVX2")
BF16 = CpuInfo("AMD EPYC 9654", frozenset({"avx2", "avx512f", "avx512_bf16"}), torch_capability="AVX512")
DIM, GRID, POINTS = 64, 8, 2


def _decoder(seed: int = 0) -> MaskDecoder:
    torch.manual_seed(seed)
    transformer = TwoWayTransformer(depth=2, embedding_dim=DIM, num_heads=8, mlp_dim=128)
    return MaskDecoder(transformer_dim=DIM, transformer=transformer, iou_head_hidden_dim=DIM).eval()


def _inputs(seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(1, DIM, GRID, GRID, generator=g)
    pe = torch.randn(1, DIM, GRID, GRID, generator=g)
    sparse = torch.randn(1, POINTS, DIM, generator=g)
    dense = torch.randn(1, DIM, 1, 1, generator=g).expand(1, DIM, GRID, GRID)
    return image, pe, sparse, dense


def _decode(dec: MaskDecoder, image, pe, sparse, dense) -> tuple[torch.Tensor, torch.Tensor]:
    hs, src = dec.attend(image, pe, sparse, dense)
    return dec.masks_from(hs, src), dec.iou_from(hs)


def test_final_attention_for_the_kept_tokens_only_gives_the_same_tokens():
    transformer = _decoder().transformer
    image, pe, sparse, _ = _inputs()
    tokens = torch.cat([torch.randn(1, 5, DIM), sparse], dim=1)
    with torch.inference_mode():
        full, keys = transformer(image, pe, tokens)
        kept, keys_kept = transformer(image, pe, tokens, keep=5)
    assert kept.shape == (1, 5, DIM) and full.shape == (1, 5 + POINTS, DIM)
    torch.testing.assert_close(kept, full[:, :5], rtol=0, atol=1e-6)
    assert torch.equal(keys, keys_kept)


def test_bf16_inference_runs_a_copy_and_returns_fp32_close_to_fp32():
    dec = _decoder()
    x = _inputs()
    with torch.inference_mode():
        masks32, iou32 = _decode(dec, *x)
        dec.inference_dtype = torch.bfloat16
        hs, _ = dec.attend(*x)
        masks16, iou16 = _decode(dec, *x)
    assert hs.dtype == torch.bfloat16
    assert masks16.dtype == iou16.dtype == torch.float32
    assert masks16.shape == masks32.shape == (1, 4, 4 * GRID, 4 * GRID)
    scale = masks32.abs().max()
    assert 0 < (masks16 - masks32).abs().max() < 0.05 * scale  # bf16 rounding, not another result
    torch.testing.assert_close(iou16, iou32, rtol=0, atol=0.05 * iou32.abs().max().item())
    # The stored weights are untouched: saving, training and export see fp32.
    assert all(p.dtype == torch.float32 for p in dec.parameters())
    assert all(v.dtype == torch.float32 for v in dec.state_dict().values())


def test_bf16_copy_is_made_again_when_a_weight_changes():
    dec = _decoder()
    dec.inference_dtype = torch.bfloat16
    x = _inputs()
    with torch.inference_mode():
        before, _ = _decode(dec, *x)
    with torch.no_grad():
        dec.output_hypernetworks_mlps[1].layers[0].weight.mul_(-2.0)
    fresh = copy.deepcopy(dec)
    fresh._cast_cache = None
    with torch.inference_mode():
        after, _ = _decode(dec, *x)
        expected, _ = _decode(fresh, *x)
    assert not torch.equal(before[:, 1], after[:, 1])
    assert torch.equal(after, expected)


def test_bf16_copy_is_made_again_when_a_submodule_or_parameter_is_replaced():
    """Not only in-place changes: a submodule swapped for another (as adapters do) or a parameter object
    replaced is seen too."""
    dec = _decoder()
    dec.inference_dtype = torch.bfloat16
    x = _inputs()
    with torch.inference_mode():
        before, _ = _decode(dec, *x)
    mlp = dec.output_hypernetworks_mlps[1]
    swapped = copy.deepcopy(mlp)
    with torch.no_grad():
        swapped.layers[0].weight.mul_(-2.0)
    dec.output_hypernetworks_mlps[1] = swapped
    with torch.inference_mode():
        after_swap, _ = _decode(dec, *x)
    assert not torch.equal(before[:, 1], after_swap[:, 1])
    dec.output_hypernetworks_mlps[1] = mlp
    mlp.layers[0].weight = torch.nn.Parameter(mlp.layers[0].weight.detach() * -2.0)
    fresh = copy.deepcopy(dec)
    fresh._cast_cache = None
    with torch.inference_mode():
        after, _ = _decode(dec, *x)
        expected, _ = _decode(fresh, *x)
    assert torch.equal(after, expected) and not torch.equal(before[:, 1], after[:, 1])


def test_with_autograd_the_stored_weights_run():
    dec = _decoder()
    x = _inputs()
    with torch.no_grad():
        masks32, iou32 = _decode(dec, *x)
    dec.inference_dtype = torch.bfloat16
    masks, iou = _decode(dec, *x)  # grad enabled: training and fine-tuning
    assert masks.requires_grad and masks.dtype == torch.float32
    assert torch.equal(masks.detach(), masks32) and torch.equal(iou.detach(), iou32)


@pytest.mark.parametrize(
    "cpu, dtype, expected",
    [
        (BF16, "auto", torch.bfloat16),
        (BF16, "bf16", torch.bfloat16),
        (BF16, "fp32", None),
        (AVX2, "auto", None),
        (AVX2, "bf16", None),  # the encoder runs the bf16 it was asked for; the decoder keeps fp32
        (AVX2, "fp32", None),
    ],
    ids=["bf16cpu-auto", "bf16cpu-bf16", "bf16cpu-fp32", "avx2-auto", "avx2-bf16", "avx2-fp32"],
)
def test_load_gives_the_decoder_bf16_only_where_it_is_native(monkeypatch, tiny_ckpt, cpu, dtype, expected):
    monkeypatch.setattr(hardware, "cpu_info", lambda: cpu)
    monkeypatch.setattr(hardware, "_warned", {"bf16"})  # the emulated-bf16 warning is tested elsewhere
    model = samkit.load(tiny_ckpt, dtype=dtype)
    assert model.mask_decoder.inference_dtype == expected
    assert all(p.dtype == torch.float32 for p in model.mask_decoder.parameters())


def test_predictor_with_a_bf16_decoder_answers_in_fp32(monkeypatch, tiny_ckpt):
    monkeypatch.setattr(hardware, "cpu_info", lambda: BF16)
    pred = samkit.Predictor(samkit.load(tiny_ckpt))
    assert pred.model.mask_decoder.inference_dtype == torch.bfloat16
    image = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    pred.set_image(image)
    masks, scores, logits = pred.predict(point_coords=np.array([[80.0, 60.0]]), point_labels=np.array([1]))
    assert masks.shape == (3, 120, 160) and masks.dtype == bool
    assert scores.dtype == logits.dtype == np.float32 and np.isfinite(logits).all()
    pred.model.mask_decoder.inference_dtype = None
    _, scores32, logits32 = pred.predict(point_coords=np.array([[80.0, 60.0]]), point_labels=np.array([1]))
    assert np.abs(scores - scores32).max() < 0.05
    assert np.abs(logits - logits32).max() < 0.05 * np.abs(logits32).max()


@pytest.mark.parametrize("size", [(120, 160), (200, 90), (30, 250), (97, 97), (256, 255)])
def test_masks_without_low_res_logits_skip_the_padding_and_match(tiny_ckpt, size):
    """low_res_logits=False decodes only the tokens over the image (plus one of margin for the bilinear
    upsampling): the full-size logits are those of the full decode, for any aspect ratio."""
    pred = samkit.Predictor(samkit.load(tiny_ckpt, dtype="fp32"))
    h, w = size
    pred.set_image(np.random.default_rng(h * w).integers(0, 255, (h, w, 3), dtype=np.uint8))
    points, labels = np.array([[w * 0.4, h * 0.6], [w - 1.0, h - 1.0]]), np.array([1, 0])
    full, scores, low_res = pred.predict(points, labels, return_logits=True)
    part, scores_part, none = pred.predict(points, labels, return_logits=True, low_res_logits=False)
    assert none is None and low_res.shape == (3, 64, 64)
    np.testing.assert_array_equal(scores_part, scores)
    scale = np.abs(full).max()
    np.testing.assert_allclose(part, full, rtol=0, atol=1e-5 * scale)
    masks, _, _ = pred.predict(points, labels, low_res_logits=False)
    sure = np.abs(full) > 1e-4 * scale
    np.testing.assert_array_equal(masks[sure], (full > 0)[sure])
    # The skipped part really is skipped: the decoding core's logits read OUTSIDE_REGION past the region.
    from samkit.models.mask_decoder import OUTSIDE_REGION

    rows, cols = pred.embedded_image.image_region()
    t = pred.transform.apply_coords_torch(torch.tensor(points[None], dtype=torch.float32), (h, w))
    _, _, logits = pred.embedded_image.decode(t, torch.tensor(labels[None]), image_only=True)
    grid = pred.features.shape[-1]
    assert (rows, cols) != (grid, grid) or max(h, w) - min(h, w) < 16
    assert (logits[..., 4 * rows :, :] == OUTSIDE_REGION).all()
    assert (logits[..., :, 4 * cols :] == OUTSIDE_REGION).all()
    assert (logits[..., : 4 * rows, : 4 * cols] != OUTSIDE_REGION).all()
