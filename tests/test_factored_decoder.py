"""The decoder's factored form (`samkit.models.factored`) against the plain computation, on random and real
weights, and where it runs (CPU fp32 inference on a prepared image) and where it does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tolerances import DECODER_DEPTH, assert_close_at_scale, assert_masks_equal

import samkit
from samkit.devices import plain_ops
from samkit.models import mask_decoder as mask_decoder_module
from samkit.models.factored import FactoredKeys
from samkit.models.mask_decoder import MaskDecoder
from samkit.models.transformer import TwoWayTransformer

pytestmark = pytest.mark.usefixtures("one_thread")

DIM, GRID = 64, 8


def _decoder(seed: int = 0) -> MaskDecoder:
    """A small SAM-shaped decoder with every weight random, the norms' gains and biases included (at their
    initial 1 and 0 a mistake in how the factored form carries them would not show)."""
    torch.manual_seed(seed)
    transformer = TwoWayTransformer(depth=2, embedding_dim=DIM, num_heads=8, mlp_dim=128)
    dec = MaskDecoder(transformer_dim=DIM, transformer=transformer, iou_head_hidden_dim=DIM).eval()
    with torch.no_grad():
        for name, p in dec.named_parameters():
            if "norm" in name or "output_upscaling.1" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.5 * torch.randn_like(p))
    return dec


def _image(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(1, DIM, GRID, GRID, generator=g) * 2 + 0.5
    pe = torch.randn(1, DIM, GRID, GRID, generator=g)
    no_mask = torch.randn(1, DIM, 1, 1, generator=g)
    return image, pe, no_mask


def _both(dec: MaskDecoder, side, sparse: torch.Tensor, **region):
    """(plain logits, iou), (factored logits, iou, FactoredKeys) for prompts `sparse` (B, N, C)."""
    with torch.inference_mode():
        hs, src = dec.attend(None, None, sparse, None, side)
        plain = dec.masks_from(hs, src, **region), dec.iou_from(hs)
        hs, keys = dec.attend(None, None, sparse, None, side, factored=True)
        fast = dec.masks_from(hs, keys, **region), dec.iou_from(hs), keys
    return plain, fast


@pytest.mark.parametrize("b, n", [(1, 2), (1, 1), (3, 4), (2, 9)])
def test_factored_decode_matches_the_plain_decoder_on_random_weights(b, n):
    """Logits and IoU of 1-3 prompts of 1-9 tokens (one point + padding, a box, several points: up to
    T * H = 112 attention columns per block) within fp32 rounding at the logits' scale."""
    dec = _decoder()
    with torch.inference_mode():
        side = dec.prepare(*_image())
    assert side.factored is not None
    sparse = torch.randn(b, n, DIM, generator=torch.Generator().manual_seed(b * 10 + n))
    (logits, iou), (fast, fast_iou, keys) = _both(dec, side, sparse)
    assert isinstance(keys, FactoredKeys) and keys.alpha.shape == (b, GRID * GRID)
    assert fast.shape == logits.shape == (b, 4, 4 * GRID, 4 * GRID)
    assert logits.std() > 0.05  # not a degenerate decoder
    assert_close_at_scale(fast.numpy(), logits.numpy(), DECODER_DEPTH, width=DIM)
    assert_close_at_scale(fast_iou.numpy(), iou.numpy(), DECODER_DEPTH, "iou", width=DIM)


def test_factored_keys_crop_and_select_give_the_same_logits():
    dec = _decoder(2)
    with torch.inference_mode():
        side = dec.prepare(*_image(3))
    sparse = torch.randn(3, 2, DIM, generator=torch.Generator().manual_seed(4))
    (logits, _), (fast, _, keys) = _both(dec, side, sparse, region=(5, 3))
    assert (fast[:, :, 20:] == mask_decoder_module.OUTSIDE_REGION).all()
    inside = (..., slice(0, 20), slice(0, 12))  # 5 x 3 tokens of 4 x 4 logits
    assert_close_at_scale(fast[inside].numpy(), logits[inside].numpy(), DECODER_DEPTH, width=DIM)
    rows = torch.tensor([True, False, True])
    with torch.inference_mode():
        hs, _ = dec.attend(None, None, sparse, None, side, factored=True)
        picked = dec.masks_from(hs[rows], keys.select(rows))
        whole = dec.masks_from(hs, keys)
    torch.testing.assert_close(picked, whole[rows], rtol=0, atol=1e-6)


def test_a_wrong_factor_is_caught():
    """The comparison above fails for a factored form that drops one piece (here the second norm's bias)."""
    dec = _decoder()
    with torch.inference_mode():
        side = dec.prepare(*_image())
    sparse = torch.randn(1, 2, DIM, generator=torch.Generator().manual_seed(12))
    (logits, _), (_, _, keys) = _both(dec, side, sparse)
    with torch.inference_mode():
        hs, _ = dec.attend(None, None, sparse, None, side, factored=True)
    wrong = FactoredKeys(keys.alpha, keys.z, keys.b.clone(), keys.conv)
    wrong.b[:, -1] = 0
    with torch.inference_mode():
        bad = dec.masks_from(hs, wrong)
    with pytest.raises(AssertionError):
        assert_close_at_scale(bad.numpy(), logits.numpy(), DECODER_DEPTH, width=DIM)


def _spy(monkeypatch) -> list:
    calls: list = []
    real = mask_decoder_module.factored_attend

    def spy(*args, **kwargs):
        calls.append(args[3].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(mask_decoder_module, "factored_attend", spy)
    return calls


def test_predictor_takes_the_factored_form_only_where_it_applies(monkeypatch, tiny_ckpt, photo):
    calls = _spy(monkeypatch)
    pred = samkit.Predictor(samkit.load(tiny_ckpt, dtype="fp32"))
    pred.set_image(photo)
    point, label = np.array([[40.0, 60.0]]), np.array([1])
    masks, scores, low = pred.predict(point_coords=point, point_labels=label)
    assert len(calls) == 1 and calls[0][0] == 1  # one prompt: tokens (1, 5 + 2, C)
    with plain_ops():  # the GPU form: no factored form
        p_masks, p_scores, p_low = pred.predict(point_coords=point, point_labels=label)
    assert len(calls) == 1
    np.testing.assert_allclose(low, p_low, rtol=0, atol=1e-4 * max(1.0, np.abs(p_low).max()))
    np.testing.assert_allclose(scores, p_scores, rtol=0, atol=1e-5)
    pred.predict(point_coords=point, point_labels=label, mask_input=low[:1])  # a mask input: plain form
    assert len(calls) == 1
    dec = pred.model.mask_decoder
    dec.inference_dtype = torch.bfloat16  # runs a bf16 copy: plain form
    pred.predict(point_coords=point, point_labels=label)
    assert len(calls) == 1
    dec.inference_dtype = None
    pred.predict(point_coords=point, point_labels=label)
    assert len(calls) == 2


def test_training_and_tracing_never_take_the_factored_form(monkeypatch):
    calls = _spy(monkeypatch)
    dec = _decoder()
    with torch.no_grad():
        side = dec.prepare(*_image())
    sparse = torch.randn(1, 2, DIM)
    hs, src = dec.attend(None, None, sparse, None, side, factored=True)  # autograd on
    assert isinstance(src, torch.Tensor) and calls == []


@pytest.mark.network
def test_factored_decode_matches_plain_on_real_vit_t_weights(monkeypatch, photo):
    """Real MobileSAM weights on a photo: the factored form's logits are within fp32 rounding of the
    plain decoder's at their scale, and the masks are the same except where a logit is within that
    bound of the threshold."""
    from samkit.zoo import checkpoint_path

    model = samkit.load(str(checkpoint_path("vit_t", progress=False)), dtype="fp32")
    pred = samkit.Predictor(model)
    pred.set_image(photo)
    h, w = pred.original_size
    points = np.array([[[w * 0.5, h * 0.5]], [[w * 0.2, h * 0.7]], [[w * 0.9, h * 0.1]]])
    coords = torch.as_tensor(pred.transform.apply_coords(points, pred.original_size), dtype=torch.float32)
    labels = torch.ones(3, 1, dtype=torch.int64)
    image = pred.embedded_image
    calls = _spy(monkeypatch)
    scores, _, low = image.decode(coords, labels)
    assert len(calls) == 3  # one prompt at a time on a CPU
    with plain_ops():
        p_scores, _, p_low = image.decode(coords, labels)
    atol = assert_close_at_scale(low.numpy(), p_low.numpy(), DECODER_DEPTH)
    assert_close_at_scale(scores.numpy(), p_scores.numpy(), DECODER_DEPTH, "iou")
    assert_masks_equal(low.numpy() > 0, p_low.numpy() > 0, p_low.numpy(), atol)
