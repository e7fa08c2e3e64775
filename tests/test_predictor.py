"""Predictor behaviour and its one-line errors for bad input (fast: a random vit_t, no reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import samkit
from samkit.errors import CheckpointError, ImageError, PromptError, SamkitError, StateError
from samkit.masks import stability_score


@pytest.fixture(scope="module")
def model(ref_checkpoint):
    _, path = ref_checkpoint("vit_t")
    return samkit.load(path, dtype="fp32")


@pytest.fixture(scope="module")
def pred(model, photo):
    p = samkit.Predictor(model)
    p.set_image(photo)
    return p


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


def test_predict_before_set_image(model):
    with pytest.raises(StateError) as exc:
        samkit.Predictor(model).predict([[1, 1]], [1])
    assert "set_image" in _one_line(exc)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(point_coords=[[700, 10]], point_labels=[1]), "outside"),
        (dict(point_coords=[[10, -1]], point_labels=[1]), "outside"),
        (dict(point_coords=[[10, 10]], point_labels=[2]), "label"),
        (dict(point_coords=[[10, 10]], point_labels=[1, 0]), "one label per point"),
        (dict(point_coords=[[10, 10]]), "together"),
        (dict(box=[300, 10, 100, 200]), "x1 >= x0"),
        (dict(box=[1000, 900, 1100, 950]), "outside"),
        (dict(point_coords=[[10, 10], [5]], point_labels=[1, 1]), "rows of different lengths"),
        (dict(point_coords=[["a", 10]], point_labels=[1]), "values that are not numbers"),
        (dict(point_coords=[[10, 10]], point_labels=[[1], [1, 0]]), "point_labels must be one number"),
        (dict(box=[1, 2, 3]), "box must be XYXY [x0, y0, x1, y1] pixels"),
        (dict(mask_input=np.zeros((64, 64))), "mask_input"),
        (dict(), "no prompt"),
    ],
)
def test_bad_prompts(pred, kwargs, fragment):
    with pytest.raises(PromptError) as exc:
        pred.predict(**kwargs)
    assert fragment in _one_line(exc)


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 5, 6, 3), np.uint8), np.zeros((10, 10, 2), np.uint8), "missing.jpg"]
)
def test_bad_images(model, bad):
    with pytest.raises(ImageError) as exc:
        samkit.Predictor(model).set_image(bad)
    _one_line(exc)


def test_corrupt_image_file(model, tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageError) as exc:
        samkit.Predictor(model).set_image(path)
    assert "broken.jpg" in _one_line(exc)


def test_gray_pil_and_path_inputs_agree(model, photo, tmp_path):
    gray = np.asarray(Image.fromarray(photo).convert("L"))
    p = samkit.Predictor(model)
    p.set_image(gray)
    a = p.embedding.clone()
    path = tmp_path / "gray.png"
    Image.fromarray(gray).save(path)
    p.set_image(path)
    assert torch.equal(a, p.embedding)
    p.set_image(Image.fromarray(gray))
    assert torch.equal(a, p.embedding)


def test_shapes_and_single_mask(pred, photo):
    h, w = photo.shape[:2]
    masks, scores, logits = pred.predict([[300, 200]], [1])
    assert masks.shape == (3, h, w) and masks.dtype == bool
    assert scores.shape == (3,) and logits.shape == (3, 256, 256)
    masks, scores, logits = pred.predict(box=[100, 100, 400, 300], multimask_output=False)
    assert masks.shape == (1, h, w) and scores.shape == (1,) and logits.shape == (1, 256, 256)
    raw, _, _ = pred.predict(box=[100, 100, 400, 300], multimask_output=False, return_logits=True)
    assert np.array_equal(raw > 0, masks)


def test_embedding_round_trip(pred, model, tmp_path):
    path = tmp_path / "emb.safetensors"
    pred.save_embedding(path)
    other = samkit.Predictor(model)
    other.load_embedding(path)
    assert other.original_size == pred.original_size and other.input_size == pred.input_size
    a = pred.predict([[300, 200], [50, 40]], [1, 0])
    b = other.predict([[300, 200], [50, 40]], [1, 0])
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)


def test_embedding_from_other_architecture_refused(pred, tmp_path, ref_checkpoint):
    path = tmp_path / "emb.safetensors"
    pred.save_embedding(path)
    _, vb = ref_checkpoint(
        "vit_b", encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1]
    )
    other = samkit.Predictor(samkit.load(vb))
    other.model.arch = "custom"
    with pytest.raises(CheckpointError):
        other.load_embedding(path)


def test_stability_score_helper():
    logits = torch.tensor([[[-2.0, -0.5, 0.5, 2.0]]])
    # threshold 0, offset 1: high mask {2.0} (1 px), low mask {-0.5, 0.5, 2.0} (3 px) -> 1/3
    assert stability_score(logits, 0.0, 1.0).item() == pytest.approx(1 / 3)


def test_checkpoint_errors(tmp_path, ref_checkpoint):
    _, path = ref_checkpoint("vit_t")
    data = path.read_bytes()
    truncated = tmp_path / "trunc.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as exc:
        samkit.load(truncated)
    assert "corrupt or truncated" in _one_line(exc)

    sd = torch.load(path, weights_only=True)
    sd.pop("mask_decoder.iou_token.weight")
    sd["image_encoder.extra.weight"] = torch.zeros(1)
    wrong = tmp_path / "wrong.pth"
    torch.save(sd, wrong)
    with pytest.raises(CheckpointError) as exc:
        samkit.load(wrong)
    msg = _one_line(exc)
    assert "mask_decoder.iou_token.weight" in msg and "image_encoder.extra.weight" in msg

    other = tmp_path / "other.pth"
    torch.save({"backbone.weight": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError) as exc:
        samkit.load(other)
    assert "not a SAM checkpoint" in _one_line(exc)

    with pytest.raises(SamkitError) as exc:
        samkit.load("vit_zz")
    assert "vit_t" in _one_line(exc)


def test_safetensors_round_trip(model, tmp_path, photo):
    path = samkit.save(model, tmp_path / "m.safetensors")
    again = samkit.load(path)
    assert again.config == model.config
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)


def _convtranspose_masks(dec, hs: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """The decoder's mask head written as in the paper's code: the two nn.ConvTranspose2d layers on a
    (B, C, 64, 64) map, then the hypernetwork dot product."""
    b, n, c = src.shape
    side = int(n**0.5)
    up = dec.output_upscaling(src.transpose(1, 2).reshape(b, c, side, side))
    hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], 1)
    return (hyper @ up.flatten(2)).view(b, -1, *up.shape[-2:])


def test_mask_head_matches_transposed_convolutions(model):
    """masks_from's per-pixel matrix products give the ConvTranspose2d result, pixel for pixel."""
    dec = model.mask_decoder
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(3, 7, 256, generator=g)
    src = torch.randn(3, 64 * 64, 256, generator=g)
    with torch.no_grad():
        ours, theirs = dec.masks_from(hs, src), _convtranspose_masks(dec, hs, src)
    assert ours.shape == theirs.shape == (3, 4, 256, 256)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # At inference the head runs in bands of rows (no_grad above); with autograd on, in one piece.
    whole = dec.masks_from(hs, src).detach()
    assert torch.equal(ours, whole)


def test_cached_first_block_and_candidates_match_full_decode(pred):
    """The per-image first-block cache and the filtered decode give the plain decoder's numbers."""
    model = pred.model
    pe, dec = model.prompt_encoder, model.mask_decoder
    coords = torch.tensor([[[100.0, 120.0]], [[500.0, 300.0]], [[800.0, 600.0]], [[20.0, 900.0]]])
    labels = torch.ones(4, 1, dtype=torch.int64)
    with torch.no_grad():
        sparse, dense = pe((coords, labels), None, None)
        plain_logits, plain_iou = dec(pred.embedding, pe.get_dense_pe(), sparse, dense, True)
    low_res, iou = pred.decode_low_res(coords, labels)  # cached first block, one prompt at a time
    torch.testing.assert_close(iou, plain_iou, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(low_res, plain_logits, atol=1e-4, rtol=1e-4)
    best = iou.max(1).values.sort().values
    cut = float(best[1] + best[2]) / 2  # between two prompts' best scores: 2 of 4 pass
    scores, rows, kept = pred.embedded_image.decode(coords, labels, min_iou=cut)
    expect = (plain_iou > cut).any(1).nonzero().flatten()
    assert 0 < len(rows) < 4 and rows.tolist() == expect.tolist()
    torch.testing.assert_close(scores, plain_iou, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kept, plain_logits[expect], atol=1e-4, rtol=1e-4)
    _, none_rows, none = pred.embedded_image.decode(coords, labels, min_iou=2.0)
    assert len(none_rows) == 0 and none.shape == (0, 3, 256, 256)


def test_bf16_encoder_runs_under_autocast(ref_checkpoint, photo, pred):
    """dtype="bf16" on a CPU: fp32 weights, bf16 matrix products, an embedding close to fp32's."""
    _, path = ref_checkpoint("vit_t")
    model = samkit.load(path, dtype="bf16")
    assert model.encoder_amp == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    p = samkit.Predictor(model)
    p.set_image(photo)
    assert p.embedding.dtype == torch.float32
    rel = float((p.embedding - pred.embedding).norm() / pred.embedding.norm())
    assert 0 < rel < 0.05
    masks, scores, _ = p.predict([[300, 200]], [1])
    assert masks.shape == (3, *photo.shape[:2]) and np.isfinite(scores).all()


def test_folded_attention_equals_plain_attention():
    """tokens_to_image / image_to_tokens (projections moved to the token side) equal Attention.forward."""
    from samkit.models.transformer import Attention

    torch.manual_seed(0)
    attn = Attention(256, 8, downsample_rate=2)
    tokens = torch.randn(3, 7, 256)
    image = torch.randn(1, 4096, 256) * 2  # one image broadcast over 3 prompts
    image3 = image.expand(3, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(
            attn.tokens_to_image(tokens, image, image * 0.5),
            attn(tokens, image3, image3 * 0.5),
            atol=2e-5,
            rtol=1e-4,
        )
        plain = attn(image3, tokens, tokens * 0.3)
        torch.testing.assert_close(
            attn.image_to_tokens(image, tokens, tokens * 0.3), plain, atol=2e-5, rtol=1e-4
        )
        qp = attn.q_proj(image)
        torch.testing.assert_close(
            attn.image_to_tokens(None, tokens, tokens * 0.3, qp=qp), plain, atol=2e-5, rtol=1e-4
        )
