"""MaskGenerator decodes masks only over the image: the padding's low-res logits are never computed
(they read OUTSIDE_REGION), and nothing downstream of them changes: the Upscaler's blocks, counts,
boxes and pasted masks, and the generator's records with the real MobileSAM weights."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_everything import _smooth_logits

import samkit
from samkit.decoding import EmbeddedImage
from samkit.image import load_image
from samkit.masks.upscale import Upscaler
from samkit.models.mask_decoder import OUTSIDE_REGION, MaskDecoder

pytestmark = pytest.mark.usefixtures("one_thread")

# (input (h, w) inside the 1024 square, original (H, W)): upscaled and downscaled frames, sides that are
# and are not multiples of the 16-pixel token (where the region's margin token matters), both orientations.
FRAMES = [
    ((683, 1024), (1000, 1500)),
    ((1024, 683), (1500, 1000)),
    ((683, 1024), (427, 640)),
    ((672, 1024), (420, 640)),
    ((1024, 672), (640, 420)),
    ((576, 1024), (1080, 1920)),
    ((1024, 311), (1023, 311)),
    ((688, 1024), (301, 448)),
    ((100, 1024), (50, 512)),
]


def _outside_region(logits: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
    """`logits` (N, 256, 256) as a masks-only decode leaves them: OUTSIDE_REGION past the image region."""
    frame = EmbeddedImage(SimpleNamespace(image_size=1024), torch.zeros(1, 1, 64, 64), (1, 1), input_size)
    rows, cols = frame.image_region()
    out = torch.full_like(logits, OUTSIDE_REGION)
    out[:, : 4 * rows, : 4 * cols] = logits[:, : 4 * rows, : 4 * cols]
    return out


@pytest.mark.parametrize("input_size, original_size", FRAMES)
def test_upscaler_ignores_the_logits_outside_the_image_region(input_size, original_size):
    low = _smooth_logits(8, 256, seed=input_size[0] + original_size[1])
    masked = _outside_region(low, input_size)
    up = Upscaler(1024, 256, input_size, original_size)
    thresholds = (1.0, -1.0)
    counts_a, a = up.count_and_mask(low, thresholds, 0.0)
    counts_b, b = up.count_and_mask(masked, thresholds, 0.0)
    assert torch.equal(counts_b, counts_a)
    # The same blocks decided the same way (not only the same pixels): the range of a block reads no
    # logit outside the region, so the padding decides nothing.
    assert torch.equal(a.full, b.full) and torch.equal(a.exact_index, b.exact_index)
    assert torch.equal(a.exact_bits, b.exact_bits)
    assert torch.equal(up.boxes(a), up.boxes(b))
    which = torch.arange(len(low))
    pasted = [torch.zeros(len(low), *original_size, dtype=torch.bool) for _ in range(2)]
    up.paste(a, which, pasted[0])
    up.paste(b, which, pasted[1])
    assert torch.equal(pasted[0], pasted[1])
    assert pasted[0].any(), "the logits give no mask at all: nothing was compared"


@pytest.fixture(scope="module")
def vit_t():
    from samkit.zoo import checkpoint_path

    return samkit.load(checkpoint_path("vit_t"), dtype="fp32")


def _spy_regions(monkeypatch) -> list:
    """Record the `region` of every mask-head call."""
    regions: list = []
    original = MaskDecoder.masks_from

    def masks_from(self, hs, src, region=None, *args, **kwargs):
        regions.append(region)
        return original(self, hs, src, region, *args, **kwargs)

    monkeypatch.setattr(MaskDecoder, "masks_from", masks_from)
    return regions


def _generate(model, image, **kw) -> list[dict]:
    gen = samkit.MaskGenerator(model, output_mode="coco_rle", threads=1, **kw)
    return gen.generate(image)


def _same_records(ours: list[dict], full: list[dict]) -> None:
    assert len(ours) == len(full)
    for a, b in zip(ours, full, strict=True):
        assert a["segmentation"] == b["segmentation"]  # the same RLE, byte for byte
        for key in ("area", "bbox", "predicted_iou", "point_coords", "crop_box"):
            assert a[key] == b[key], key
        assert a["stability_score"] == b["stability_score"] or (
            np.isnan(a["stability_score"]) and np.isnan(b["stability_score"])
        )


# 640 x 422 -> 1024 x 675 (the region keeps 43 + 1 token rows); 640 x 420 -> 1024 x 672, a multiple of
# the token (the bilinear support reaches into the margin token); and an upright frame.
@pytest.mark.network  # the real vit_t weights (downloaded into the cache on first use)
@pytest.mark.parametrize("size", [None, (640, 420), "upright"])
def test_masks_only_generator_equals_the_full_decode(vit_t, photo, monkeypatch, size):
    from PIL import Image

    if size == "upright":
        image = np.ascontiguousarray(photo.transpose(1, 0, 2))
    elif size is not None:
        image = np.asarray(Image.fromarray(photo).resize(size, Image.BICUBIC))
    else:
        image = photo
    kw = dict(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    regions = _spy_regions(monkeypatch)
    ours = _generate(vit_t, image, **kw)
    frame = EmbeddedImage.encode(vit_t, image)
    expected = frame.image_region()
    assert expected[0] * expected[1] < 64 * 64  # a non-square image: some tokens are padding
    assert regions and all(r == expected for r in regions), "the generator decoded the padding too"

    regions.clear()
    monkeypatch.setattr(EmbeddedImage, "image_region", lambda self: tuple(self.features.shape[-2:]))
    full = _generate(vit_t, image, **kw)
    assert regions and all(r == (64, 64) for r in regions)
    assert len(ours) >= 20  # real masks through stability, NMS and RLE
    _same_records(ours, full)


@pytest.mark.network
@pytest.mark.slow  # five crops, twice
def test_masks_only_generator_equals_the_full_decode_on_crops(vit_t, monkeypatch):
    from conftest import PHOTOS, needs_shared

    image = load_image(needs_shared(PHOTOS[1]))
    kw = dict(points_per_side=8, crop_n_layers=1, min_mask_region_area=100)
    regions = _spy_regions(monkeypatch)
    ours = _generate(vit_t, image, **kw)
    assert any(r != (64, 64) for r in regions)
    monkeypatch.setattr(EmbeddedImage, "image_region", lambda self: tuple(self.features.shape[-2:]))
    full = _generate(vit_t, image, **kw)
    assert len({tuple(o["crop_box"]) for o in ours}) > 1
    _same_records(ours, full)
