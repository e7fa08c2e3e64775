"""Training data: sources (COCO, SA-1B, mask folders, BSDS500), the mix, augmentation, synthetic scenes."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import DATASETS
from PIL import Image

from samkit.train.config import AugmentConfig, ConfigError, DataConfig
from samkit.train.data import Mix, augment_params, build_source, to_input_frame
from samkit.train.synthetic import CopyPasteSource, SyntheticSource

COCO_TRAIN = DATASETS / "instances" / "coco_mini" / "train"


def test_coco_source_skips_crowd_and_matches_annotation_count():
    src = build_source({"type": "coco", "path": str(COCO_TRAIN), "range": [0, 3]})
    data = json.loads((COCO_TRAIN / "annotations.json").read_text())
    assert len(src) == 3
    for k in range(3):
        sample = src[k]
        info = src.images[k]
        expected = [a for a in data["annotations"] if a["image_id"] == info["id"] and not a.get("iscrowd", 0)]
        assert sample.image.shape == (info["height"], info["width"], 3)
        assert sample.masks.shape[1:] == sample.image.shape[:2]
        assert 0 < len(sample.masks) <= len(expected)
        assert sample.masks.reshape(len(sample.masks), -1).any(1).all()


def test_range_holds_out_the_tail():
    whole = build_source({"type": "coco", "path": str(COCO_TRAIN)})
    train = build_source({"type": "coco", "path": str(COCO_TRAIN), "range": [0, -5]})
    val = build_source({"type": "coco", "path": str(COCO_TRAIN), "range": [-5, None]})
    assert len(train) + len(val) == len(whole)
    assert {im["id"] for im in train.images}.isdisjoint({im["id"] for im in val.images})


def test_eval_splits_are_refused():
    with pytest.raises(ConfigError, match="evaluation split"):
        build_source({"type": "coco", "path": str(DATASETS / "instances" / "coco_mini" / "val")})
    with pytest.raises(ConfigError, match="evaluation split"):
        build_source({"type": "masks", "path": str(DATASETS / "interactive" / "GrabCut")})
    with pytest.raises(ConfigError, match="test"):
        build_source({"type": "bsds500", "path": str(DATASETS / "bsds500"), "splits": ["test"]})


def test_bsds500_skips_eval_overlap():
    src = build_source({"type": "bsds500", "path": str(DATASETS / "bsds500")})
    overlap = set((DATASETS / "bsds500" / "eval-overlap.txt").read_text().split())
    assert overlap and not overlap & {m.stem for m in src.mats}
    sample = src[0]
    assert len(sample.masks) >= 4 and sample.masks.shape[1:] == sample.image.shape[:2]


def test_mask_folder_both_layouts(tmp_path):
    img = np.zeros((20, 30, 3), np.uint8)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(img).save(tmp_path / "images" / "a.png")
    Image.fromarray(img).save(tmp_path / "images" / "b.jpg")
    one = np.zeros((20, 30), np.uint8)
    one[2:8, 3:9] = 255
    one[10, 10] = 128  # RITM ignore band: not object
    Image.fromarray(one).save(tmp_path / "masks" / "a.png")
    for k in range(2):
        m = np.zeros((20, 30), np.uint8)
        m[k * 10 : k * 10 + 5, :5] = 1
        Image.fromarray(m).save(tmp_path / "masks" / f"b_{k}.png")
    src = build_source({"type": "masks", "path": str(tmp_path)})
    assert len(src) == 2
    a, b = src[0], src[1]
    assert a.masks.shape == (1, 20, 30) and a.masks.sum() == 36
    assert b.masks.shape == (2, 20, 30) and b.masks[1, 10:15, :5].all()


def test_sa1b_folder(tmp_path):
    from samkit.formats import write_sa1b

    img = np.zeros((16, 24, 3), np.uint8)
    Image.fromarray(img).save(tmp_path / "sa_1.jpg")
    m = np.zeros((16, 24), bool)
    m[4:10, 5:12] = True
    write_sa1b(
        tmp_path / "sa_1.json",
        {"image_id": 1, "width": 24, "height": 16, "file_name": "sa_1.jpg"},
        [{"segmentation": m, "predicted_iou": 0.9, "stability_score": 0.9, "point_coords": [[6, 6]]}],
    )
    sample = build_source({"type": "sa1b", "path": str(tmp_path)})[0]
    assert np.array_equal(sample.masks[0], m)


def test_mix_draws_by_weight():
    a, b = SyntheticSource(4, 32, 0), SyntheticSource(4, 32, 1)
    mix = Mix([a, b], [3.0, 1.0])
    rng = np.random.default_rng(0)
    draws = [mix.draw(rng)[0] for _ in range(2000)]
    assert 0.7 < draws.count(0) / len(draws) < 0.8


def test_synthetic_scenes_are_deterministic_with_exact_masks():
    src = SyntheticSource(3, 64, seed=5)
    s1, s2 = src[1], SyntheticSource(3, 64, seed=5)[1]
    assert np.array_equal(s1.image, s2.image) and np.array_equal(s1.masks, s2.masks)
    assert max(s1.image.shape[:2]) == 64
    # Visible parts never overlap (later shapes occlude earlier ones).
    assert (s1.masks.sum(0) <= 1).all()


def test_copy_paste_puts_object_pixels_under_their_mask():
    objects = SyntheticSource(4, 48, seed=1, textured=False)
    backgrounds = SyntheticSource(4, 64, seed=2)
    src = CopyPasteSource(objects, backgrounds, count=5, max_objects=2, seed=3)
    s = src[0]
    assert len(s.masks) >= 1 and s.masks.shape[1:] == s.image.shape[:2]
    assert (s.masks.sum(0) <= 1).all()
    assert np.array_equal(src[0].image, s.image)


def test_input_frame_resize_crop_flip():
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, :100] = 255
    masks = np.zeros((1, 100, 200), bool)
    masks[0, :, :100] = True
    out, m = to_input_frame(image, masks, 64)
    assert out.shape == (32, 64, 3) and m.shape == (1, 32, 64)
    params = augment_params(AugmentConfig(scale=[2.0, 2.0], hflip=1.0), np.random.default_rng(0))
    out, m = to_input_frame(image, masks, 64, params)
    assert out.shape == (64, 64, 3)
    # After the flip the white (object) half is on the right; image and mask stay aligned.
    assert np.array_equal(out[..., 0] > 127, m[0])


def test_step_batches_are_the_same_with_or_without_workers():
    """Batches and the generator handed back do not depend on how many worker processes draw them."""
    from samkit.train.data import BatchDrawer, step_batches

    sources = [SyntheticSource(6, 96, seed=3), SyntheticSource(4, 64, seed=4)]
    data = DataConfig(
        masks_per_image=2,
        batch_size=2,
        cache_variants=1,
        augment=AugmentConfig(scale=[0.6, 1.4], hflip=0.5, vflip=0.5, color=0.3),
    )
    drawer = BatchDrawer(sources, Mix(sources, [1.0, 2.0]), data, seed=7, image_size=64)
    drawn = [list(step_batches(drawer, 5, 11, workers)) for workers in (0, 2)]
    assert len(drawn[0]) == len(drawn[1]) == 6
    for (batch_a, rng_a), (batch_b, rng_b) in zip(*drawn, strict=True):
        assert [k for k, _, _ in batch_a] == [k for k, _, _ in batch_b]
        for (_, img_a, m_a), (_, img_b, m_b) in zip(batch_a, batch_b, strict=True):
            assert np.array_equal(img_a, img_b) and np.array_equal(m_a, m_b)
        assert rng_a.random() == rng_b.random()
    # Step 7 drawn alone (a resumed run) is step 7 of the sequence.
    (batch, rng), *_ = step_batches(drawer, 7, 8, 0)
    assert np.array_equal(batch[0][1], drawn[0][2][0][0][1])


def test_cached_variants_are_keyed_by_their_augmentation():
    """Two configs sharing an embedding cache never share a differently augmented copy."""
    from samkit.train.data import BatchDrawer

    src = SyntheticSource(2, 64)
    aug = AugmentConfig(scale=[0.5, 1.5], hflip=0.5, color=0.2)
    keys = []
    for seed, augment in ((0, aug), (1, aug), (0, dataclasses.replace(aug, color=0.4))):
        data = DataConfig(masks_per_image=1, batch_size=1, cache_variants=2, augment=augment)
        drawer = BatchDrawer([src], Mix([src], [1.0]), data, seed=seed, image_size=64, cached=True)
        keys.append([drawer.variant(0, 0, v, src[0])[0] for v in (0, 1)])
    assert keys[0][0] == keys[1][0] == keys[2][0] == f"{src.name}/0#v0"
    assert len({k[1] for k in keys}) == 3


def test_sample_keys_differ_between_datasets_and_selections():
    """Keys name embedding-cache files: image 1 of two COCO-style train splits must not share one."""
    ccp = DATASETS / "instances" / "ccp" / "train"
    a = build_source({"type": "coco", "path": str(COCO_TRAIN), "range": [0, 2]})
    b = build_source({"type": "coco", "path": str(ccp), "range": [0, 2]})
    assert {a[k].key for k in range(2)}.isdisjoint(b[k].key for k in range(2))
    c = build_source({"type": "coco", "path": str(COCO_TRAIN), "range": [1, 3]})
    assert a[1].key == c[0].key and a.ident != c.ident
    paste = [CopyPasteSource(src, src, count=2, seed=0).name for src in (a, b, c)]
    assert len(set(paste)) == 3
    assert SyntheticSource(2, 64).name != SyntheticSource(2, 128).name
