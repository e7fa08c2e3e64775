"""`samkit train` with a `task: prompt_head` config: teacher (resumable) + fit end to end on a tiny model,
the refusal of evaluation splits, and the per-grid-point targets, loss and held-out recall."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import samkit
from samkit.embedding_file import config_id
from samkit.errors import InputError
from samkit.everything.learned import grid_cells, head_metadata, load_head
from samkit.models.build import SamConfig, build_sam
from samkit.train.prompt_head import (
    add_box_targets,
    box_loss,
    box_targets,
    containment_targets,
    grid_point_loss,
    grid_target,
    kept_by_nms,
    point_targets,
    relabel_from_kept,
    teacher_model,
    teacher_recall,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _other_model():
    """A tiny random SAM of another architecture than `tiny_ckpt`'s (two heads instead of one)."""
    cfg = SamConfig("vit", embed_dim=32, depth=1, num_heads=2, global_attn_indexes=(0,), image_size=256)
    return build_sam(cfg)


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
        "fit": {"steps": 3, "batch": 2, "holdout": 1, "box_steps": 2},
    }
    path = tmp_path / "prompt_head.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _train(config: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "samkit.cli", "train", config, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_train_from_config_loads_the_model_once(tiny_ckpt, photo, tmp_path, monkeypatch):
    """Teacher, relabelling and box targets share the one model `train_from_config` loads."""
    from samkit.train.prompt_head import train_from_config

    folder = tmp_path / "images"
    folder.mkdir()
    for i, arr in enumerate([photo, photo[:, ::-1]]):
        Image.fromarray(np.ascontiguousarray(arr)).save(folder / f"im{i}.png")
    config = _config(tmp_path, folder, tiny_ckpt)
    loads = []
    real_load = samkit.load
    monkeypatch.setattr(samkit, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    info = train_from_config(config)
    assert loads == [(tiny_ckpt,)]
    assert len(list((tmp_path / "run" / "teacher").glob("*.npz"))) == 2 and info["steps"] == 3


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
    d = np.load(teacher[0])
    assert d["grid_iou"].shape == d["grid_match"].shape == (16,)  # points_per_side 4
    # each kept mask's own prompt point decodes that very mask
    assert (d["grid_iou"] == 1.0).sum() >= min(len(d["points"]), 1)
    assert d["grid_box"].shape == (16, 4)
    head = load_head(out / "prompt_head.safetensors")
    # the file records the model it reads: accepted for that model, refused for another architecture
    assert head.trained_for is not None and head.trained_for["model_config"] == config_id(
        samkit.load(tiny_ckpt)
    )
    samkit.MaskGenerator(
        samkit.load(tiny_ckpt), prompts="learned", prompt_head=out / "prompt_head.safetensors"
    )
    with pytest.raises(InputError, match="trained on"):
        samkit.MaskGenerator(_other_model(), prompts="learned", prompt_head=out / "prompt_head.safetensors")
    x = torch.randn(1, 256, 16, 16)
    logits = head(x)
    assert logits.shape == (1, 1, 16, 16) and torch.isfinite(logits).all()
    assert head.has_boxes and torch.isfinite(head.extents(x)).all()
    card = (out / "MODEL_CARD.md").read_text()
    assert "3 training-split images" in card and "3 steps" in card and "box branch | 2 steps" in card

    # A rerun (here with overrides) reuses every teacher file: the teacher step is resumable. It fits on
    # the config's images only: the fourth image's teacher file stays in the shared folder, unused.
    stamps = [f.stat().st_mtime_ns for f in teacher]
    again = _train(config, "--set", "fit.steps=2", "--set", "teacher.per_folder=3")
    assert again.returncode == 0, again.stderr
    assert "trained 2 steps" in again.stdout
    assert [f.stat().st_mtime_ns for f in teacher] == stamps
    info = json.loads((out / "prompt_head.json").read_text())
    used = sorted(info["files"] + [f"{n}.npz" for n in info["heldout_images"]])
    assert used == [f.name for f in teacher[:3]] and len(info["files"]) == 2
    assert "2 training-split images" in (out / "MODEL_CARD.md").read_text()
    assert teacher_model(teacher) == head_metadata(samkit.load(tiny_ckpt))

    # another model must not learn from these embeddings: refused in one line, nothing changed
    other = tmp_path / "other.safetensors"
    samkit.save(_other_model(), other)
    head_bytes = (out / "prompt_head.safetensors").read_bytes()
    clash = _train(config, "--set", f"model={other}")
    assert clash.returncode == 2 and "holds teacher files of" in clash.stderr
    assert len(clash.stderr.strip().splitlines()) == 1
    assert [f.stat().st_mtime_ns for f in teacher] == stamps
    assert (out / "prompt_head.safetensors").read_bytes() == head_bytes


def test_teacher_folders_take_listed_images_once_each_and_refuse_bad_lists(tmp_path):
    from samkit.train.config import ConfigError
    from samkit.train.prompt_head import teacher_file, training_images

    folder = tmp_path / "nuclei" / "train" / "images"
    folder.mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png", "d.png"):
        (folder / name).write_bytes(b"")
    names = tmp_path / "crowded.txt"
    names.write_text("# the most crowded first\nd.png\na.png  # also among the first two\n\nc.png\n")
    images = training_images([folder, {"folder": str(folder), "images": str(names)}], per_folder=2)
    # interleaved: a, then the list's first (d), b, then a again (skipped), then c
    assert [p.name for p in images] == ["a.png", "d.png", "b.png", "c.png"]
    assert teacher_file(tmp_path, images[1]) == tmp_path / "nuclei_d.npz"

    names.write_text("e.png\n")
    with pytest.raises(ConfigError, match="e.png .* is not an image of"):
        training_images([{"folder": str(folder), "images": str(names)}])
    with pytest.raises(ConfigError, match="image list not found"):
        training_images([{"folder": str(folder), "images": str(tmp_path / "none.txt")}])
    with pytest.raises(ConfigError, match="a folder, or"):
        training_images([{"folder": str(folder)}])
    val = tmp_path / "instances" / "nuclei" / "val" / "images"
    val.mkdir(parents=True)
    with pytest.raises(ConfigError, match="evaluation split"):
        training_images([{"folder": str(val), "images": str(names)}])


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
    entries = cfg["teacher"]["folders"]
    for entry in entries:
        needs_shared(ROOT / (entry["folder"] if isinstance(entry, dict) else entry))
    folders = [ROOT / f for f in entries if not isinstance(f, dict)]
    lists = [
        {"folder": str(ROOT / f["folder"]), "images": str(ROOT / f["images"])}
        for f in entries
        if isinstance(f, dict)
    ]
    images = training_images(folders + lists, cfg["teacher"]["per_folder"])
    listed = sum(len(training_images([e])) for e in lists)
    assert (
        len(folders) * cfg["teacher"]["per_folder"]
        <= len(images)
        <= len(folders) * cfg["teacher"]["per_folder"] + listed
    )
    assert cfg["fit"]["holdout"] < len(images)


def _rle(box: tuple[int, int, int, int], size: tuple[int, int] = (40, 40)) -> dict:
    from pycocotools import mask as mask_utils

    m = np.zeros(size, dtype=np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 1
    return mask_utils.encode(np.asfortranarray(m))


def _record(box, point, iou) -> dict:
    x0, y0, x1, y1 = box
    return {
        "segmentation": _rle(box),
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "predicted_iou": iou,
        "point_coords": [point],
    }


def test_point_targets_score_each_grid_point_by_its_best_mask_against_the_kept_ones():
    grid = np.array([[5.0, 5.0], [15.0, 5.0], [25.0, 5.0], [35.0, 5.0]])
    records = [
        _record((0, 0, 20, 20), [5.0, 5.0], 0.99),  # kept (best score)
        _record((0, 0, 20, 16), [15.0, 5.0], 0.95),  # dropped by NMS: IoU 0.8 with the first
        _record((30, 30, 40, 40), [15.0, 5.0], 0.90),  # kept: point 1's other mask
        _record((0, 0, 20, 10), [25.0, 5.0], 0.93),  # dropped (box IoU 0.5 > 0.4): half the first
    ]
    kept = kept_by_nms(records, 0.4)
    assert kept.tolist() == [0, 2]
    iou, match = point_targets(records, kept, grid)
    # point 1 has two masks: a near copy of kept 0 and kept 1 itself; the better one (IoU 1.0) counts
    np.testing.assert_allclose(iou, [1.0, 1.0, 0.5, 0.0])
    assert match.tolist() == [0, 1, 0, -1]  # point 3: no mask passed the filters
    # a generator's own NMS keeps exactly kept_by_nms's masks (here no NMS at all at 1.0)
    assert kept_by_nms(records, 1.0).tolist() == [0, 1, 3, 2]


def test_kept_by_nms_reproduces_the_grid_runs_kept_masks(photo):
    import samkit
    from samkit.models.build import SamConfig, build_sam

    torch.manual_seed(0)
    cfg = SamConfig("vit", embed_dim=32, depth=1, num_heads=1, global_attn_indexes=(0,), image_size=256)
    model = build_sam(cfg)
    kw = dict(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0, output_mode="coco_rle")
    kept_run = samkit.MaskGenerator(model, box_nms_thresh=0.7, **kw).generate(photo)
    everything = samkit.MaskGenerator(model, box_nms_thresh=1.0, **kw).generate(photo)
    kept = kept_by_nms(everything, 0.7)
    assert len(everything) > len(kept_run) > 0
    assert [everything[k]["segmentation"] for k in kept] == [r["segmentation"] for r in kept_run]


def test_grid_target_shares_a_masks_target_among_the_points_that_find_it():
    iou = np.array([1.0, 0.9, 0.8, 0.6, 1.0, 0.3, 0.0])
    match = np.array([0, 0, 0, 0, 1, 1, -1])
    np.testing.assert_allclose(grid_target(iou, match), iou)
    # mask 0 is found by 4 points (IoU >= 0.5), mask 1 by one (the 0.3 point does not count)
    np.testing.assert_allclose(
        grid_target(iou, match, share=2.0), [0.5, 0.45, 0.4, 0.3, 1.0, 0.3, 0.0], rtol=1e-6
    )
    # power 0.5: divided by sqrt(4) = 2 points' worth, not 4 (large objects' points keep more weight)
    np.testing.assert_allclose(
        grid_target(iou, match, share=1.0, power=0.5), [0.5, 0.45, 0.4, 0.3, 1.0, 0.3, 0.0], rtol=1e-6
    )
    np.testing.assert_allclose(grid_target(iou, match, share=4.0, power=0.5), iou, rtol=1e-6)


def test_teacher_recall_counts_each_kept_mask_once_at_its_best_picked_point():
    iou = np.array([1.0, 0.9, 0.7, 1.0, 0.0])
    match = np.array([0, 0, 1, 1, -1])
    assert teacher_recall(iou, match, 2, np.arange(5)) == 1.0
    # mask 0 at 0.9: recovered at thresholds 0.5..0.9 (9 of 10); mask 1 at 0.7 (5 of 10)
    assert teacher_recall(iou, match, 2, np.array([1, 2, 4])) == pytest.approx((0.9 + 0.5) / 2)
    assert teacher_recall(iou, match, 3, np.array([], dtype=np.int64)) == 0.0


def test_grid_point_loss_reads_the_heat_map_at_the_grid_points_cells():
    # 480 x 640 photo, 768 x 1024 model input, 4 x 4 grid: point (col 1, row 2) is at model pixel (384, 480)
    _, _, cells = grid_cells((480, 640), (768, 1024), 4, 64)
    assert cells[2 * 4 + 1] == 30 * 64 + 24
    target = torch.zeros(1, 16)
    target[0, 9] = 1.0
    logits = torch.full((1, 1, 64, 64), -6.0)
    good = logits.clone()
    good[0, 0, 30, 24] = 6.0
    wrong_cell = logits.clone()
    wrong_cell[0, 0, 31, 24] = 6.0
    c = torch.from_numpy(cells)[None]
    assert grid_point_loss(good, c, target) < grid_point_loss(logits, c, target)
    assert grid_point_loss(wrong_cell, c, target) == grid_point_loss(logits, c, target)


def test_containment_targets_give_each_point_the_smallest_kept_mask_holding_it():
    kept = [_rle((0, 0, 30, 30)), _rle((0, 0, 10, 10))]  # a large mask with a small one inside
    grid = np.array([[5.0, 5.0], [20.0, 5.0], [35.0, 35.0], [29.9, 29.9]])
    iou, match = containment_targets(kept, grid)
    assert match.tolist() == [1, 0, -1, 0]
    np.testing.assert_array_equal(iou, [1.0, 1.0, 0.0, 1.0])
    assert containment_targets([], grid)[1].tolist() == [-1] * 4


def test_box_targets_are_the_box_of_the_smallest_kept_mask_holding_each_point():
    kept = [_rle((0, 0, 30, 30)), _rle((0, 0, 10, 10))]
    bboxes = [[0, 0, 30, 30], [0, 0, 10, 10]]  # XYWH
    grid = np.array([[5.0, 5.0], [20.0, 5.0], [35.0, 35.0]])
    boxes = box_targets(kept, bboxes, grid)
    np.testing.assert_array_equal(boxes[:2], [[0, 0, 10, 10], [0, 0, 30, 30]])
    assert np.isnan(boxes[2]).all() and np.isnan(box_targets([], [], grid)).all()


def test_box_loss_reads_the_extents_at_the_grid_points_cells_and_skips_points_in_no_mask():
    cells = torch.tensor([[0, 5]])
    target = torch.tensor([[[0.5, 0.5, 1.0, 1.0], [float("nan")] * 4]])
    extents = torch.zeros(1, 4, 4, 4)
    extents[0, :, 0, 0] = torch.tensor([0.5, 0.5, 1.0, 1.0])
    assert box_loss(extents, cells, target) == 0.0
    extents[0, :, 1, 1] = 9.0  # cell 5: its point lies in no kept mask
    assert box_loss(extents, cells, target) == 0.0
    extents[0, 0, 0, 0] = 2.0
    assert box_loss(extents, cells, target) > 0.0


def _one_teacher_file(tiny_ckpt, photo, tmp_path):
    """A teacher run on one training image (a 4 x 4 grid, no filters): its file and the teacher settings."""
    from samkit.train.prompt_head import make_teacher

    folder = tmp_path / "set" / "train" / "images"
    folder.mkdir(parents=True)
    Image.fromarray(photo).save(folder / "a.png")
    settings = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    make_teacher([folder / "a.png"], tmp_path / "teacher", tiny_ckpt, settings=settings)
    (f,) = (tmp_path / "teacher").glob("*.npz")
    return f, settings


def test_add_box_targets_gives_old_teacher_files_the_boxes_a_teacher_run_records(tiny_ckpt, photo, tmp_path):
    import os

    f, settings = _one_teacher_file(tiny_ckpt, photo, tmp_path)
    d = dict(np.load(f))
    recorded = d.pop("grid_box")
    assert recorded.shape == (16, 4) and np.isfinite(recorded).any()
    np.savez(f, **d)  # a file from before the box targets
    os.utime(f, ns=(1, 10**18))
    add_box_targets([f], tiny_ckpt, settings)
    new = np.load(f)
    assert f.stat().st_mtime_ns == 10**18 and set(new.files) == set(d) | {"grid_box"}
    # the kept masks come back from their points and the embedding: the same boxes as the grid run's
    np.testing.assert_allclose(new["grid_box"], recorded, atol=2.0)


def test_relabel_from_kept_fills_targets_of_old_teacher_files_and_keeps_their_order(
    tiny_ckpt, photo, tmp_path
):
    import os

    f, settings = _one_teacher_file(tiny_ckpt, photo, tmp_path)
    d = dict(np.load(f))
    assert str(d.pop("targets")) == "decoded"
    d.pop("grid_match")
    d.pop("grid_iou")
    d.pop("grid_box")
    np.savez(f, **d)  # a file from before the per-point targets
    os.utime(f, ns=(1, 10**18))
    relabel_from_kept([f], tiny_ckpt, settings)
    new = np.load(f)
    assert str(new["targets"]) == "containment" and f.stat().st_mtime_ns == 10**18
    assert new["grid_iou"].shape == (16,) and set(np.unique(new["grid_iou"])) <= {0.0, 1.0}
    assert new["grid_box"].shape == (16, 4)
    # the kept masks come back from their points alone: the labels are those of the grid run's kept masks
    import samkit
    from samkit.everything.grids import point_grid

    kept = samkit.MaskGenerator(samkit.load(tiny_ckpt), output_mode="coco_rle", **settings).generate(photo)
    assert len(kept) == len(d["points"]) > 0
    grid = point_grid(4) * [photo.shape[1], photo.shape[0]]
    iou, match = containment_targets([r["segmentation"] for r in kept], grid)
    np.testing.assert_array_equal(new["grid_match"], match)
    np.testing.assert_array_equal(new["grid_iou"], iou)


def test_teacher_files_record_their_model_and_fit_writes_it_into_the_head(tiny_ckpt, photo, tmp_path):
    from samkit.train.prompt_head import fit

    f, _ = _one_teacher_file(tiny_ckpt, photo, tmp_path)
    made = teacher_model([f])
    assert made == head_metadata(samkit.load(tiny_ckpt))
    d = dict(np.load(f))
    for i in range(3):
        np.savez(f.parent / f"copy{i}.npz", **d)
    fit(f.parent, tmp_path / "head.safetensors", steps=1, holdout=1)  # as `python -m ... fit` runs it
    assert load_head(tmp_path / "head.safetensors").trained_for == made
    np.savez(tmp_path / "older.npz", **{k: v for k, v in d.items() if k not in ("model", "model_config")})
    assert teacher_model([tmp_path / "older.npz"]) is None  # a file that records none says nothing
    assert teacher_model([f, tmp_path / "older.npz"]) == made
    np.savez(tmp_path / "other.npz", **{**d, "model": np.array("vit_b"), "model_config": np.array("0" * 16)})
    with pytest.raises(ValueError, match="more than one model"):
        teacher_model([f, tmp_path / "other.npz"])
