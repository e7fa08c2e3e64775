"""The embedding file contract: one writer/reader, the encoder fingerprint checked on load."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_ARCH

import samkit
from samkit import embedding_file
from samkit.embedding_file import EmbeddingInfo, EncoderId, fingerprint
from samkit.errors import CheckpointError
from samkit.models.build import SamConfig, build_sam


def _tiny(seed: int):
    torch.manual_seed(seed)
    model = build_sam(SamConfig.from_dict(TINY_ARCH)).eval()
    model.arch = "vit_t"  # a fine-tune keeps its base's architecture name
    return model


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (90, 200, 3), dtype=np.uint8)


def test_round_trip_records_sizes_and_fingerprint(image, tmp_path):
    model = _tiny(0)
    pred = samkit.Predictor(model)
    pred.set_image(image)
    path = tmp_path / "e.safetensors"
    pred.save_embedding(path)
    info = embedding_file.read_info(path)
    assert info.original_size == (90, 200) and info.input_size == (58, 128)
    assert info.encoder == EncoderId("vit_t", 128, embedding_file.config_id(model), fingerprint(model))
    other = samkit.Predictor(model)
    other.load_embedding(path)
    assert torch.equal(other.features, pred.features) and other.input_size == pred.input_size
    assert not list(tmp_path.glob(".*.tmp")), "the atomic write left a temp file behind"


def test_other_weights_of_the_same_architecture_are_refused_in_one_line(image, tmp_path):
    pred = samkit.Predictor(_tiny(0))
    pred.set_image(image)
    pred.save_embedding(tmp_path / "e.safetensors")
    tuned = samkit.Predictor(_tiny(1))  # same architecture and name, other weights
    with pytest.raises(CheckpointError, match="other vit_t weights") as exc:
        tuned.load_embedding(tmp_path / "e.safetensors")
    assert "\n" not in str(exc.value) and "re-embed" in str(exc.value)


def test_files_without_a_fingerprint_still_load(image, tmp_path):
    """Files written before fingerprints existed: only the architecture is checked."""
    from safetensors.numpy import save_file

    model = _tiny(0)
    meta = {
        "original_size": "90,200",
        "input_size": "58,128",
        "arch": "vit_t",
        "image_size": "128",
        "model_config": embedding_file.config_id(model),
    }
    emb = np.random.default_rng(1).standard_normal((1, 256, 8, 8)).astype(np.float32)
    save_file({"embedding": emb}, str(tmp_path / "old.safetensors"), metadata=meta)
    pred = samkit.Predictor(_tiny(1))
    pred.load_embedding(tmp_path / "old.safetensors")
    assert np.array_equal(pred.features.numpy(), emb) and pred.original_size == (90, 200)
    meta["model_config"] = "0" * 16
    save_file({"embedding": emb}, str(tmp_path / "arch.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="made by model 'vit_t'"):
        pred.load_embedding(tmp_path / "arch.safetensors")


def test_unreadable_file_is_a_checkpoint_error(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read embedding"):
        embedding_file.load(tmp_path / "bad.safetensors")
    info = EmbeddingInfo((1, 1), (1, 1), EncoderId("x", 1, "c", "f"))
    embedding_file.save(tmp_path / "ok.safetensors", np.zeros((1, 2, 1, 1), np.float32), info)
    assert embedding_file.read_info(tmp_path / "ok.safetensors") == info


def test_fingerprint_follows_the_weights_and_the_encoder_precision():
    a, b = _tiny(0), _tiny(0)
    assert fingerprint(a) == fingerprint(b) and len(fingerprint(a)) == 16
    assert fingerprint(_tiny(1)) != fingerprint(a)
    before = fingerprint(a)
    with torch.no_grad():
        next(a.image_encoder.parameters()).add_(1.0)  # an in-place change, as an optimiser step makes
    assert fingerprint(a) != before
    b.encoder_amp = torch.bfloat16
    assert fingerprint(b) != before
    b.encoder_amp = None
    assert fingerprint(b) == before
    changed = fingerprint(a)
    with torch.no_grad():
        a.mask_decoder.iou_token.weight.add_(1.0)  # the decoder does not change embeddings
    assert fingerprint(a) == changed


def test_module_imports_without_torch():
    code = "import sys, samkit.embedding_file, samkit.transforms; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fingerprint_follows_the_preprocessing():
    """Same encoder weights, other normalisation: other embeddings, so another fingerprint."""
    model = _tiny(0)
    before = fingerprint(model)
    model.normalize = "minmax"
    assert fingerprint(model) != before
    model.normalize = "mean_std"
    with torch.no_grad():
        model.pixel_std.mul_(2.0)
    assert fingerprint(model) != before
