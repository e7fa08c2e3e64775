"""`samkit train` with a `task: prompt_head` config: teacher (resumable) + fit end to end on a tiny model,
and the refusal of evaluation splits."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from samkit.everything.learned import load_head

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path, folder, model) -> str:
    cfg = {
        "task": "prompt_head",
        "model": model,
        "out": str(tmp_path / "run"),
        "threads": 1,
        "teacher": {
            "folders": [str(folder)],
            # a random model: no mask would pass the default filters
            "settings": {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0},
        },
        "fit": {"steps": 3, "batch": 2, "holdout": 1},
    }
    path = tmp_path / "prompt_head.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _train(config: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "samkit.cli", "train", config, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_samkit_train_prompt_head_config_writes_a_loadable_head_and_card(tiny_ckpt, photo, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, arr in enumerate([photo, photo[:, ::-1], photo[::-1], photo[:300]]):
        Image.fromarray(np.ascontiguousarray(arr)).save(folder / f"im{i}.png")
    config = _config(tmp_path, folder, tiny_ckpt)

    run = _train(config)
    assert run.returncode == 0, run.stderr
    out = tmp_path / "run"
    assert "trained 3 steps" in run.stdout and str(out / "prompt_head.safetensors") in run.stdout
    teacher = sorted((out / "teacher").glob("*.npz"))
    assert len(teacher) == 4
    assert all(len(np.load(f)["points"]) > 0 for f in teacher)
    head = load_head(out / "prompt_head.safetensors")
    logits = head(torch.randn(1, 256, 16, 16))
    assert logits.shape == (1, 1, 16, 16) and torch.isfinite(logits).all()
    card = (out / "MODEL_CARD.md").read_text()
    assert "3 training-split images" in card and "3 steps" in card

    # A rerun (here with an override) reuses every teacher file: the teacher step is resumable.
    stamps = [f.stat().st_mtime_ns for f in teacher]
    again = _train(config, "--set", "fit.steps=2")
    assert again.returncode == 0, again.stderr
    assert "trained 2 steps" in again.stdout
    assert [f.stat().st_mtime_ns for f in teacher] == stamps


def test_samkit_train_prompt_head_refuses_an_evaluation_split(tiny_ckpt, tmp_path):
    folder = tmp_path / "instances" / "coco_mini" / "val" / "images"
    folder.mkdir(parents=True)
    run = _train(_config(tmp_path, folder, tiny_ckpt))
    assert run.returncode != 0
    assert "evaluation split" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "prompt_head.safetensors").exists()


def test_samkit_train_prompt_head_rejects_unknown_keys(tiny_ckpt, tmp_path):
    run = _train(_config(tmp_path, tmp_path, tiny_ckpt), "--set", "fit.stepz=2")
    assert run.returncode != 0 and "unknown key 'stepz'" in run.stderr


def test_shipped_prompt_head_config_lists_existing_training_folders():
    from conftest import ROOT, needs_shared

    from samkit.train.prompt_head import load_prompt_head_config, training_images

    cfg = load_prompt_head_config(ROOT / "configs" / "prompt_head.yaml")
    folders = [needs_shared(ROOT / f) for f in cfg["teacher"]["folders"]]
    images = training_images(folders, cfg["teacher"]["per_folder"])
    assert len(images) == len(folders) * cfg["teacher"]["per_folder"]
    assert cfg["fit"]["holdout"] < len(images)
