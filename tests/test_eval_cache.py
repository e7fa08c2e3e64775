"""The eval embedding cache: keyed by encoder weights, shared by models with the same encoder, same results."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import samkit
from samkit.embedding_file import fingerprint as encoder_fingerprint
from samkit.eval import run_eval
from samkit.eval.cache import CachedPredictor

GRABCUT = Path("/work/shared/datasets/interactive/GrabCut")
needs_data = pytest.mark.skipif(not GRABCUT.is_dir(), reason="shared datasets not present")


def _decoder_tuned(path: str, out: Path) -> str:
    """A copy of the checkpoint at `path` with a changed mask decoder (a 'decoder-only fine-tune')."""
    model = samkit.load(path)
    with torch.no_grad():
        for p in model.mask_decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    samkit.save(model, out)
    return str(out)


def test_fingerprint_follows_the_encoder_only(tiny_ckpt, tmp_path):
    base = samkit.load(tiny_ckpt)
    tuned = samkit.load(_decoder_tuned(tiny_ckpt, tmp_path / "dec.safetensors"))
    assert encoder_fingerprint(base) == encoder_fingerprint(tuned)
    changed = samkit.load(tiny_ckpt)
    with torch.no_grad():
        next(changed.image_encoder.parameters()).view(-1)[0] += 1e-3
    assert encoder_fingerprint(changed) != encoder_fingerprint(base)
    changed = samkit.load(tiny_ckpt)
    changed.pixel_std.fill_(1.0)
    assert encoder_fingerprint(changed) != encoder_fingerprint(base)


def test_cached_predictor_encodes_each_image_once_and_matches_the_plain_one(tiny_ckpt, tmp_path, photo):
    model = samkit.load(tiny_ckpt)
    plain = samkit.Predictor(model)
    plain.set_image(photo)
    first, second = CachedPredictor(model, tmp_path), CachedPredictor(model, tmp_path)
    first.set_image(photo)
    second.set_image(photo)
    assert (first.misses, first.hits, second.misses, second.hits) == (1, 0, 0, 1)
    assert torch.equal(second.embedding, plain.embedding)
    assert second.original_size == plain.original_size and second.input_size == plain.input_size
    point = np.array([[50.0, 40.0]])
    want, got = plain.predict(point, np.array([1])), second.predict(point, np.array([1]))
    assert all(np.array_equal(a, b) for a, b in zip(want, got, strict=True))


@needs_data
def test_run_eval_shares_embeddings_between_models_with_one_encoder(tiny_ckpt, tmp_path):
    cache = tmp_path / "emb"
    tuned = _decoder_tuned(tiny_ckpt, tmp_path / "dec.safetensors")
    base = run_eval("single-point", GRABCUT, tiny_ckpt, limit=2, progress=False, embedding_cache=cache)
    hit = run_eval("single-point", GRABCUT, tuned, limit=2, progress=False, embedding_cache=cache)
    plain = run_eval("single-point", GRABCUT, tuned, limit=2, progress=False)
    assert base["meta"]["settings"]["embedding_cache"]["misses"] == 2
    assert hit["meta"]["settings"]["embedding_cache"] | {"dir": None} == {"dir": None, "hits": 2, "misses": 0}
    assert hit["items"] == plain["items"]
    assert hit["items"] != base["items"]  # the decoder differs, so the answers do


@needs_data
def test_proposals_and_the_cli_use_the_cache(tiny_ckpt, tmp_path, capsys):
    from samkit.cli import main

    cache, out = tmp_path / "emb", tmp_path / "r.json"
    args = ["eval", "proposals", "--data", str(GRABCUT), "--model", tiny_ckpt, "--limit", "1"]
    args += ["--points-per-side", "2", "--out", str(out), "--embedding-cache", str(cache)]
    assert main(args) == 0 and main(args) == 0
    capsys.readouterr()
    report = json.loads(out.read_text())
    assert report["meta"]["settings"]["embedding_cache"]["hits"] == 1
    assert report["meta"]["settings"]["embedding_cache"]["misses"] == 0
    plain = run_eval("proposals", GRABCUT, tiny_ckpt, limit=1, points_per_side=2, progress=False)
    assert report["items"] == json.loads(json.dumps(plain["items"]))
