"""`samkit everything` and `samkit segment` run as real commands in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import PHOTO, PHOTOS
from PIL import Image
from pycocotools.coco import COCO

from samkit.engine.local import read_manifest
from samkit.formats import read_sa1b, sa1b_masks

FAST = ["--points-per-side", "3", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]


def samkit_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run(
        [sys.executable, "-m", "samkit.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """A folder of awkward inputs: same-stem photos in two subfolders, gray, RGBA, corrupt and huge images."""
    root = tmp_path_factory.mktemp("images")
    (root / "a").mkdir()
    (root / "b").mkdir()
    photo = Image.open(PHOTO).convert("RGB")
    photo.save(root / "a" / "img.jpg")
    Image.open(PHOTOS[1]).convert("RGB").save(root / "b" / "img.jpg")
    photo.convert("L").save(root / "gray.png")
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "rgba.png")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
    huge = np.full((4000, 6000, 3), 200, np.uint8)
    huge[1000:3000, 1500:4500] = (30, 90, 160)
    Image.fromarray(huge).save(root / "huge.png")
    return root


GOOD = ["a/img.json", "b/img.json", "gray.json", "huge.json", "rgba.json"]


def test_everything_folder_resume_and_formats(tiny_ckpt, image_folder, tmp_path):
    out = tmp_path / "out"
    coco = tmp_path / "coco.json"
    run = samkit_cli(
        "everything",
        str(image_folder),
        "--out",
        str(out),
        "--model",
        tiny_ckpt,
        "--overlay",
        "--coco",
        str(coco),
        *FAST,
    )
    assert run.returncode == 0, run.stderr
    assert "done 5, skipped 0 (already done), failed 1" in run.stderr
    assert "corrupt.jpg" in run.stderr
    assert "img/s" in run.stderr  # the progress bar's rate, images per second
    for rel in GOOD:
        data = read_sa1b(out / rel)
        image = Image.open(image_folder / data["image"]["file_name"]) if "/" not in rel else None
        masks = sa1b_masks(data)
        assert masks.shape[1:] == (data["image"]["height"], data["image"]["width"])
        if image is not None:
            assert (data["image"]["width"], data["image"]["height"]) == image.size
        assert (out / rel).with_name(Path(rel).stem + ".overlay.jpg").exists()
    assert read_sa1b(out / "huge.json")["image"]["width"] == 6000
    assert not list(out.rglob("corrupt*.json"))

    api = COCO(str(coco))
    assert len(api.getImgIds()) == 5
    first = read_sa1b(out / "a/img.json")
    img_id = next(
        i for i in api.getImgIds() if api.imgs[i]["file_name"].endswith(os.path.join("a", "img.jpg"))
    )
    coco_masks = [api.annToMask(a).astype(bool) for a in api.loadAnns(api.getAnnIds(imgIds=[img_id]))]
    np.testing.assert_array_equal(np.stack(coco_masks), sa1b_masks(first))

    # A rerun skips what is done and only retries the corrupt file.
    again = samkit_cli("everything", str(image_folder), "--out", str(out), "--model", tiny_ckpt, *FAST)
    assert again.returncode == 0
    assert "done 0, skipped 5 (already done), failed 1" in again.stderr
    done = [e["json"] for e in read_manifest(out / "manifest.jsonl") if e["status"] == "done"]
    assert sorted(done) == GOOD
    # --overwrite redoes them.
    redo = samkit_cli(
        "everything",
        str(image_folder / "gray.png"),
        "--out",
        str(out),
        "--model",
        tiny_ckpt,
        "--overwrite",
        *FAST,
    )
    assert redo.returncode == 0 and "done 1," in redo.stdout


def test_everything_killed_and_restarted_processes_each_image_once(tiny_ckpt, tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(8):
        Image.open(PHOTOS[i % len(PHOTOS)]).convert("RGB").save(src / f"p{i}.jpg")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "samkit.cli",
        "everything",
        str(src),
        "--out",
        str(out),
        "--model",
        tiny_ckpt,
        *FAST,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("*.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = len(list(out.glob("*.json")))
    assert 1 <= first < 8, "kill the run part way through"
    assert not list(out.glob(".*.tmp")), "an atomic write left a temp file behind"

    rerun = samkit_cli("everything", str(src), "--out", str(out), "--model", tiny_ckpt, *FAST)
    assert rerun.returncode == 0, rerun.stderr
    entries = [e for e in read_manifest(out / "manifest.jsonl") if e["status"] == "done"]
    names = [e["json"] for e in entries]
    assert sorted(names) == [f"p{i}.json" for i in range(8)]  # each image exactly once
    processed_by_rerun = sum(not e.get("recovered") for e in entries) - first
    assert processed_by_rerun <= 8 - first + 1
    for i in range(8):
        assert json.loads((out / f"p{i}.json").read_text())["image"]["file_name"] == f"p{i}.jpg"


def test_everything_bad_input_is_one_line(tiny_ckpt, tmp_path):
    run = samkit_cli(
        "everything", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--model", tiny_ckpt
    )
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "not found" in run.stderr


def test_segment_point_box_single(tiny_ckpt, tmp_path):
    out = tmp_path / "seg"
    run = samkit_cli(
        "segment",
        str(PHOTO),
        "--point",
        "300,200",
        "--point",
        "100,50,0",
        "--out",
        str(out),
        "--model",
        tiny_ckpt,
    )
    assert run.returncode == 0, run.stderr
    scores = json.loads((out / f"{PHOTO.stem}_scores.json").read_text())
    assert len(scores["masks"]) == 3
    assert (out / f"{PHOTO.stem}_overlay.png").exists()
    assert len(list(out.glob(f"{PHOTO.stem}_mask_*.png"))) == 3

    out2 = tmp_path / "seg2"
    run = samkit_cli(
        "segment", str(PHOTO), "--box", "100,80,400,300", "--single", "--out", str(out2), "--model", tiny_ckpt
    )
    assert run.returncode == 0, run.stderr
    assert len(json.loads((out2 / f"{PHOTO.stem}_scores.json").read_text())["masks"]) == 1


def test_segment_point_outside_image_is_one_line(tiny_ckpt, tmp_path):
    run = samkit_cli(
        "segment", str(PHOTO), "--point", "5000,10", "--out", str(tmp_path), "--model", tiny_ckpt
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "outside" in lines[0]


def test_generator_flags_default_to_the_generator_defaults():
    """`samkit everything`'s generator flags and MaskGenerator's keyword defaults come from one place."""
    import dataclasses
    import inspect

    from samkit.cli import GENERATOR_HELP, _build_parser
    from samkit.everything import GeneratorSettings, MaskGenerator

    args = _build_parser().parse_args(["everything", "photos", "--out", "masks"])
    signature = inspect.signature(MaskGenerator).parameters
    names = [f.name for f in dataclasses.fields(GeneratorSettings)]
    assert names == list(GENERATOR_HELP)
    assert {n: getattr(args, n) for n in names} == {n: signature[n].default for n in names}
    assert args.points_per_side == 32 and args.crop_overlap_ratio == 512 / 1500
