"""samkit-nano: the encoder's construction, its warm start from a TinyViT teacher, distillation of a toy
nano student, and the shipped checkpoint through the Predictor tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TOY_TINY_VIT, tiny_train_config
from test_predictor import (  # noqa: F401  (run here again, on the shipped nano model)
    test_bad_images,
    test_bad_prompts,
    test_embedding_round_trip,
    test_predict_before_set_image,
    test_safetensors_round_trip,
    test_shapes_and_single_mask,
)

import samkit
from samkit.models.build import NANO, SamConfig, build_sam
from samkit.models.nano import NanoEncoder, _resample_biases, warm_start
from samkit.train import read_metrics, train

TOY_TINY = {**TOY_TINY_VIT, "tiny_classifier_head": False, "image_size": 256}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_nano_encoder_shape_and_config_round_trip(tmp_path):
    cfg = SamConfig.from_dict({**TOY_TINY, "encoder": "nano", "nano_input_size": 128})
    model = build_sam(cfg)
    assert isinstance(model.image_encoder, NanoEncoder)
    with torch.inference_mode():
        emb = model.image_encoder(torch.randn(2, 3, 256, 256))
    assert emb.shape == (2, 256, 16, 16)
    path = samkit.save(model, tmp_path / "nano.safetensors", name="toy-nano")
    again = samkit.load(path)
    assert again.config == cfg and again.arch == "toy-nano"


def test_warm_start_gives_the_teacher_at_the_inner_size_upsampled():
    torch.manual_seed(0)
    teacher = build_sam(SamConfig.from_dict({**TOY_TINY, "encoder": "tiny_vit", "image_size": 128}))
    student = build_sam(SamConfig.from_dict({**TOY_TINY, "encoder": "nano", "nano_input_size": 128}))
    copied = warm_start(student, teacher)
    assert copied == len(teacher.state_dict())  # every teacher tensor has a place in the student
    x = torch.randn(1, 3, 256, 256)
    with torch.inference_mode():
        small = F.interpolate(x, size=(128, 128), mode="bilinear", antialias=True)
        want = F.interpolate(teacher.image_encoder(small), size=(16, 16), mode="bilinear")
        got = student.image_encoder(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(student.mask_decoder.iou_token.weight, teacher.mask_decoder.iou_token.weight)


def test_bias_tables_resample_by_clamped_offset():
    table = torch.arange(2 * 9, dtype=torch.float32).view(2, 9)  # window 3: index dy * 3 + dx
    wide = _resample_biases(table, 5).view(2, 5, 5)
    assert torch.equal(wide[:, :3, :3], table.view(2, 3, 3))
    assert torch.equal(wide[:, 4, 4], table[:, 8]) and torch.equal(wide[:, 0, 4], table[:, 2])
    assert torch.equal(_resample_biases(table, 2), table.view(2, 3, 3)[:, :2, :2].reshape(2, 4))


def test_distilling_a_toy_nano_student_reduces_embedding_mse(tmp_path):
    """The shipped recipe (configs/nano.yaml) in miniature: nano warm-started from a TinyViT teacher."""
    torch.manual_seed(0)
    teacher_cfg = SamConfig.from_dict({**TOY_TINY, "encoder": "tiny_vit"})
    teacher_path = samkit.save(build_sam(teacher_cfg), tmp_path / "t.safetensors")
    cfg = tiny_train_config(
        tmp_path / "run",
        mode="distill",
        teacher=str(teacher_path),
        model={"init": str(teacher_path), "arch": {**TOY_TINY, "encoder": "nano", "nano_input_size": 128}},
        data={"train": [{"type": "synthetic", "count": 4, "size": 256}], "batch_size": 2},
        optim={"steps": 24, "lr": 2.0e-3, "warmup": 2},
        log_every=4,
    )
    result = train(cfg, progress=False)
    rows, _ = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["mse"] < 0.75 * rows[0]["mse"], [r["mse"] for r in rows]
    student = samkit.load(result["model"])
    assert student.config.encoder == "nano"


# --- the shipped checkpoint ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return samkit.load("nano", dtype="fp32", progress=False)


@pytest.fixture(scope="module")
def pred(model, photo):
    p = samkit.Predictor(model)
    p.set_image(photo)
    return p


def test_shipped_nano_is_registered_small_and_fp32_on_load(model):
    entry = samkit.zoo.registry()["nano"]
    assert entry.config == NANO and entry.size <= 25_000_000
    assert model.arch == "nano" and model.config == NANO
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_shipped_nano_agrees_with_its_teacher_on_a_photo(pred, photo):
    """A click and a box on the photo's main object: nano's masks overlap MobileSAM's (measured with the
    shipped file: best pair of the 3 candidates IoU 0.89, box IoU 0.88)."""
    teacher = samkit.Predictor(samkit.load("vit_t", dtype="fp32", progress=False))
    teacher.set_image(photo)
    a, _, _ = pred.predict([[425, 190]], [1])
    b, _, _ = teacher.predict([[425, 190]], [1])
    assert max(_iou(x, y) for x in a for y in b) > 0.8
    box = [300, 100, 550, 400]
    a, _, _ = pred.predict(box=box, multimask_output=False)
    b, _, _ = teacher.predict(box=box, multimask_output=False)
    assert _iou(a[0], b[0]) > 0.75


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))
