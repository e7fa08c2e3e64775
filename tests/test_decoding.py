"""The decoding core (`samkit.decoding.EmbeddedImage`) that Predictor and MaskGenerator share, and the one
upsampling implementation (`samkit.masks.upscale`) every front end calls."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tolerances import DECODER_DEPTH, assert_close_at_scale

import samkit
from samkit.decoding import EmbeddedImage
from samkit.devices import plain_ops
from samkit.export.wrappers import DecoderForExport
from samkit.masks.upscale import interpolate_logits, upscale_logits
from samkit.models.mask_decoder import MaskDecoder
from samkit.transforms import preprocess_shape

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt):
    return samkit.load(tiny_ckpt)


def _logits(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 8


def test_upscale_logits_equals_sams_two_bilinear_steps_in_both_forms(tiny_model):
    low = _logits(2, 3, 64, 64)
    size, original = tiny_model.image_size, (333, 500)
    input_size = preprocess_shape(*original, size)
    expect = F.interpolate(low, (size, size), mode="bilinear", align_corners=False)
    expect = F.interpolate(
        expect[..., : input_size[0], : input_size[1]], original, mode="bilinear", align_corners=False
    )
    opencv = upscale_logits(low, size, input_size, original)
    with plain_ops():
        plain = upscale_logits(low, size, input_size, original)
    assert opencv.shape == plain.shape == (2, 3, *original) and opencv.dtype == torch.float32
    torch.testing.assert_close(plain, expect, atol=0, rtol=0)
    # OpenCV rounds differently: within 1e-5 of the largest |logit|; masks differ only next to 0.
    assert float((opencv - expect).abs().max()) <= 1e-5 * float(expect.abs().max())
    clear = expect.abs() > 1e-3
    assert torch.equal((opencv > 0)[clear], (expect > 0)[clear])
    torch.testing.assert_close(
        tiny_model.postprocess_masks(low, input_size, original), expect, atol=0, rtol=0
    )
    torch.testing.assert_close(interpolate_logits(low, size, input_size, original), expect, atol=0, rtol=0)


def test_exported_decoder_upsamples_with_the_same_function(tiny_model):
    """The ONNX graph (what OnnxPredictor runs) computes its input frame from orig_im_size and then the
    same `interpolate_logits` as the Predictor."""
    low = _logits(1, 4, 64, 64)
    wrapper = DecoderForExport(tiny_model)
    original = (333, 500)
    graph = wrapper._upscale(low, torch.tensor(original, dtype=torch.float32))
    ours = interpolate_logits(low, tiny_model.image_size, preprocess_shape(*original, 256), original)
    torch.testing.assert_close(graph, ours, atol=0, rtol=0)


def test_predictor_decodes_through_one_embedded_image(tiny_model, photo, tmp_path):
    pred = samkit.Predictor(tiny_model)
    pred.set_image(photo)
    image = pred.embedded_image
    assert pred.embedded_image is image and image.features is pred.embedding
    assert (image.original_size, image.input_size) == (pred.original_size, pred.input_size)
    masks, scores, _ = pred.predict(np.array([[300.0, 200.0]]), np.array([1]))
    assert image.upscaler() is image.upscaler()  # made once per image
    path = tmp_path / "e.safetensors"
    pred.save_embedding(path)
    pred.load_embedding(path)
    loaded = pred.embedded_image
    assert loaded is not image and torch.equal(loaded.features, image.features)
    again, again_scores, _ = pred.predict(np.array([[300.0, 200.0]]), np.array([1]))
    assert np.array_equal(again, masks) and np.allclose(again_scores, scores, atol=1e-6)
    pred.reset_image()
    with pytest.raises(samkit.SamkitError, match="no image set"):
        pred.embedded_image  # noqa: B018 (the property raises)


def test_threads_share_one_embedded_image(tiny_model, photo, monkeypatch):
    """Worker threads decoding batches of one image make its first-block work once, and decode what one
    thread alone decodes: the same numbers up to fp32 rounding (a reduction may be split differently when
    several threads run ops at once; on AVX2 kernels that moves the last bit), so a race on the shared
    caches, which changes values far more, still fails."""
    image = EmbeddedImage.encode(tiny_model, photo)
    coords = torch.tensor([[[30.0, 40.0]], [[200.0, 100.0]], [[120.0, 160.0]]])
    labels = torch.ones(3, 1, dtype=torch.int64)
    alone = EmbeddedImage(tiny_model, image.features, image.original_size, image.input_size)
    expect = alone.decode(coords, labels)
    prepared = []
    prepare = MaskDecoder.prepare

    def counted(self, *args):
        prepared.append(self is tiny_model.mask_decoder)  # not a reduced-precision copy it delegates to
        return prepare(self, *args)

    monkeypatch.setattr(MaskDecoder, "prepare", counted)
    start = threading.Barrier(4)
    results: list[tuple[torch.Tensor, ...]] = []

    def work() -> None:
        start.wait()
        results.append(image.decode(coords, labels))

    workers = [threading.Thread(target=work) for _ in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert sum(prepared) == 1 and len(results) == 4
    for iou, rows, logits in results:
        assert_close_at_scale(iou, expect[0], DECODER_DEPTH, "predicted IoU")
        assert rows.tolist() == [0, 1, 2]
        assert_close_at_scale(logits, expect[2], DECODER_DEPTH)


def test_features_assigned_directly_decode_with_their_own_first_block(tiny_model, photo):
    """A Predictor whose `features` and sizes are set directly (an embedding cache restoring an image it
    encoded before, as benchmarks/eval_table.py does) decodes that image: the decoder's per-image
    first-block work used to stay the previous image's, giving other masks."""
    other = np.ascontiguousarray(photo[::-1, ::-1])
    fresh = samkit.Predictor(tiny_model)
    fresh.set_image(photo)
    point, label = np.array([[300.0, 200.0]]), np.array([1])
    expect, expect_scores, _ = fresh.predict(point, label)
    pred = samkit.Predictor(tiny_model)
    pred.set_image(photo)
    saved = (pred.features, pred.original_size, pred.input_size)
    pred.set_image(other)
    pred.predict(point, label)  # the other image's first block is made here
    pred.features, pred.original_size, pred.input_size = saved
    masks, scores, _ = pred.predict(point, label)
    np.testing.assert_allclose(scores, expect_scores, atol=1e-6, rtol=0)
    assert np.array_equal(masks, expect)
