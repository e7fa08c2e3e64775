"""The one image pipeline: numpy and torch forms agree, and padding comes after normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samkit.transforms import ImagePipeline


@pytest.mark.parametrize("normalize", ["mean_std", "minmax"])
def test_numpy_and_torch_forms_give_the_same_input_padded_with_zeros(normalize):
    pipe = ImagePipeline(64, normalize=normalize)
    image = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    resized = pipe.apply_image(image)
    assert resized.shape == (38, 64, 3)
    x = pipe.to_input(resized)
    assert x.shape == (1, 3, 64, 64) and x.dtype == np.float32
    assert not x[..., 38:, :].any(), "padding must be exactly 0 after normalisation"
    t = pipe.to_input_torch(torch.from_numpy(np.array(resized)).permute(2, 0, 1)[None].float())
    assert np.array_equal(t.numpy(), x)
    assert np.array_equal(pipe(image), x)
    inside = x[0, :, :38, :]
    if normalize == "minmax":
        assert inside.min() == 0.0 and inside.max() == 1.0
    else:
        mean = np.asarray(pipe.pixel_mean, dtype=np.float32).reshape(3, 1, 1)
        std = np.asarray(pipe.pixel_std, dtype=np.float32).reshape(3, 1, 1)
        assert np.array_equal(inside, (resized.transpose(2, 0, 1).astype(np.float32) - mean) / std)


def test_the_model_preprocess_is_the_pipeline(ref_checkpoint):
    import samkit

    model = samkit.load(ref_checkpoint("vit_t")[1], dtype="fp32")
    pipe = ImagePipeline.of(model)
    assert (pipe.image_size, pipe.normalize, pipe.interpolation) == (1024, "mean_std", "bilinear")
    x = torch.rand(1, 3, 700, 1024) * 255
    assert torch.equal(model.preprocess(x), pipe.to_input_torch(x))


def test_points_and_boxes_map_to_the_input_frame():
    pipe = ImagePipeline(1024)
    assert pipe.input_size((480, 640)) == (768, 1024)
    assert np.allclose(pipe.apply_coords(np.array([[640.0, 480.0]]), (480, 640)), [[1024.0, 768.0]])
    assert np.allclose(pipe.apply_boxes(np.array([0.0, 0.0, 320.0, 240.0]), (480, 640)), [[0, 0, 512, 384]])


def test_unknown_normalisation_is_refused():
    with pytest.raises(ValueError, match="normalize"):
        ImagePipeline(64, normalize="zscore")
