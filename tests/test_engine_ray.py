"""The Ray engine on a real local Ray instance (2 CPUs and 2 logical GPUs on 127.0.0.1): same outputs as
the local engine, a killed worker's images retried elsewhere exactly once, resumable reruns, shards,
corrupt files, and GPU actors that each get their own GPU id (on the CPU, as this machine has no CUDA)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import DATASETS, needs_shared

import samkit
from samkit.engine.inputs import list_images
from samkit.engine.local import read_manifest, run_local
from samkit.engine.ray_engine import RayEngine, RayEngineError, actor_device, run_ray
from samkit.engine.shards import read_shard_index

ray = pytest.importorskip("ray")

# Thresholds at 0 so that every grid point yields a mask: the comparison covers real post-processing.
GEN = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


@pytest.fixture(scope="module")
def ray_local():
    """A real Ray instance with 2 CPUs and 2 logical GPUs on 127.0.0.1, shared by this module's tests."""
    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            num_gpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            object_store_memory=80 * 1024**2,
            logging_level="warning",
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """20 small train-split photos (street scenes and nuclei, two subfolders) and one corrupt JPEG."""
    root = tmp_path_factory.mktemp("images")
    for sub, src in [
        ("camvid", DATASETS / "instances" / "camvid" / "train" / "images"),
        ("dsb", DATASETS / "instances" / "dsb2018" / "train" / "images"),
    ]:
        (root / sub).mkdir()
        for f in sorted(needs_shared(src).glob("*.jpg"))[:10]:
            shutil.copy(f, root / sub / f.name)
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 8)
    return root


@pytest.fixture(scope="module")
def local_out(tiny_ckpt, images, tmp_path_factory) -> Path:
    """The local engine's output over `images`: what the Ray engine must reproduce."""
    out = tmp_path_factory.mktemp("local")
    gen = samkit.MaskGenerator(samkit.load(tiny_ckpt), output_mode="coco_rle", **GEN)
    # One thread, like each 1-CPU Ray worker (on the shared 2-core machine 2 threads are ~10x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_local(list_images(images), gen, out, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


def _outputs(out: Path) -> dict[str, dict]:
    """Every SA-1B JSON of a run (not the shard index), by path relative to `out`."""
    files = (p for p in sorted(out.rglob("*.json")) if "shards" not in p.relative_to(out).parts)
    return {str(p.relative_to(out)): json.loads(p.read_text()) for p in files}


def _without_ids(outputs: dict[str, dict]) -> dict[str, dict]:
    """Outputs with image_id dropped: it is the image's index in the input list, which differs when a
    run leaves an image out."""
    return {k: {**v, "image": {**v["image"], "image_id": None}} for k, v in outputs.items()}


def test_ray_output_equals_local_and_corrupt_is_reported(ray_local, tiny_ckpt, images, local_out, tmp_path):
    out = tmp_path / "ray"
    paths = list_images(images)
    summary = run_ray(paths, out, tiny_ckpt, GEN, workers=2, batch_size=3, progress=False)

    assert summary.count("done") == 20 and summary.count("failed") == 1
    assert summary.failed[0].path.name == "corrupt.jpg" and summary.failed[0].reason
    expected = _outputs(local_out)
    assert len(expected) == 20 and all(v["annotations"] for v in expected.values())
    assert _outputs(out) == expected  # same masks, scores, boxes, image ids, byte-for-byte JSON content
    manifest = read_manifest(out / "manifest.jsonl")
    assert len(manifest) == 21
    (bad,) = [e for e in manifest if e["status"] == "failed"]
    assert bad["image"].endswith("corrupt.jpg") and bad["reason"]
    assert len({e["worker"] for e in manifest}) == 2  # both workers did some of the work


def test_killed_worker_is_replaced_every_image_once_and_rerun_does_no_work(
    ray_local, tiny_ckpt, images, local_out, tmp_path
):
    out = tmp_path / "ray"
    paths = [p for p in list_images(images) if p.name != "corrupt.jpg"]
    engine = RayEngine(tiny_ckpt, GEN, workers=2, batch_size=2)
    killed: list[int] = []

    def kill_one_worker(result):
        if not killed:
            pid = engine.worker_pids()[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    try:
        summary = engine.run(paths, out, progress=False, on_result=kill_one_worker)
        assert engine.restarts >= 1
        assert killed[0] not in engine.worker_pids()
    finally:
        engine.close()

    assert summary.count("done") == 20 and summary.count("failed") == 0
    manifest = read_manifest(out / "manifest.jsonl")
    assert sorted(e["json"] for e in manifest) == sorted(_outputs(local_out))  # each image exactly once
    assert any(e["attempt"] > 1 for e in manifest)  # the dead worker's images were retried
    assert _without_ids(_outputs(out)) == _without_ids(_outputs(local_out))

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}
    engine = RayEngine(tiny_ckpt, GEN, workers=2)
    again = engine.run(paths, out, progress=False)
    assert engine._actors == []  # nothing to do, so no worker was even started
    assert again.count("skipped") == 20
    assert read_manifest(out / "manifest.jsonl") == manifest
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.json")} == before


def test_resume_skips_and_recovers_as_the_local_engine_does(tiny_ckpt, tmp_path):
    """A folder left by a killed run (every JSON written, b's manifest line cut off, c's never logged):
    both engines repair the manifest, log b and c as recovered, redo nothing and write the same lines."""
    images = tmp_path / "images"
    images.mkdir()
    paths = []
    for name in ("a", "b", "c"):
        paths.append(images / f"{name}.jpg")
        paths[-1].write_bytes(b"never read: its JSON is there")
    a_line = json.dumps({"image": str(paths[0]), "json": "a.json", "status": "done", "masks": 1}) + "\n"
    outs = {}
    for engine in ("local", "ray"):
        out = outs[engine] = tmp_path / engine
        out.mkdir()
        for name in ("a", "b", "c"):
            (out / f"{name}.json").write_text("{}")
        (out / "manifest.jsonl").write_text(a_line + '{"image": "b.jpg", "json": "b.js')
    gen = samkit.MaskGenerator(samkit.load(tiny_ckpt), output_mode="coco_rle", **GEN)
    local = run_local(paths, gen, outs["local"], progress=False)
    ray_engine = RayEngine(tiny_ckpt, GEN, workers=1)
    remote = ray_engine.run(paths, outs["ray"], progress=False)

    assert ray_engine._actors == []  # nothing to do, so Ray was not even asked for a worker
    assert [r.status for r in remote.results] == [r.status for r in local.results] == ["skipped"] * 3
    lines = (outs["ray"] / "manifest.jsonl").read_text()
    assert lines == (outs["local"] / "manifest.jsonl").read_text()
    recovered = [
        {"image": str(p), "json": f"{p.stem}.json", "status": "done", "recovered": True} for p in paths[1:]
    ]
    assert [json.loads(line) for line in lines.splitlines()] == [json.loads(a_line), *recovered]
    assert all((outs["ray"] / f"{name}.json").read_text() == "{}" for name in ("a", "b", "c"))


def test_shards_hold_images_and_json_with_an_index(ray_local, tiny_ckpt, images, tmp_path):
    out = tmp_path / "ray"
    paths = list_images(images)
    run_ray(paths, out, tiny_ckpt, GEN, workers=1, batch_size=4, shard_size=8, progress=False)

    index = read_shard_index(out)
    assert index["shard_size"] == 8 and [s["file"] for s in index["shards"]] == [
        f"sa_00000{i}.tar" for i in range(3)
    ]
    assert sum(len(s["images"]) for s in index["shards"]) == 20
    assert sum(len(s["failed"]) for s in index["shards"]) == 1
    for shard in index["shards"]:
        with tarfile.open(out / "shards" / shard["file"]) as tar:
            names = tar.getnames()
            assert names == [n for e in shard["images"] for n in (e["image"], e["json"])]
            for e in shard["images"]:
                assert tar.extractfile(e["json"]).read() == (out / e["json"]).read_bytes()
                image = next(
                    p for p in paths if p.name == Path(e["image"]).name and p.parent.name in e["image"]
                )
                assert tar.extractfile(e["image"]).read() == image.read_bytes()

    tars = {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")}
    run_ray(paths, out, tiny_ckpt, GEN, workers=1, shard_size=8, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")} == tars  # not repacked


def test_cli_engine_ray_joins_a_running_cluster(ray_local, tiny_ckpt, images, local_out, tmp_path):
    out = tmp_path / "cli"
    address = ray.get_runtime_context().gcs_address
    args = ["everything", str(images), "--out", str(out), "--model", tiny_ckpt, "--engine", "ray"]
    args += ["--address", address, "--workers", "1", "--batch-size", "5", "--points-per-side", "4"]
    args += ["--gpus-per-worker", "0.5"]  # a logical GPU: the worker finds no CUDA and runs on the CPU
    args += ["--pred-iou-thresh", "0", "--stability-score-thresh", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-m", "samkit.cli", *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert run.returncode == 0, run.stderr
    assert "done 20" in run.stdout + run.stderr and "corrupt.jpg" in run.stderr
    assert _outputs(out) == _outputs(local_out)


# --- GPU actors (Ray's logical GPUs; no CUDA on this machine) --------------------------------------------

CUDA = torch.cuda.is_available()


def test_actor_device_is_the_actors_own_gpu_or_the_cpu_with_one_warning(caplog, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # as Ray sets it for an actor holding GPU 1
    with caplog.at_level(logging.WARNING, logger="samkit.engine.ray_engine"):
        assert actor_device([]) == "cpu"
        assert actor_device(["1"], cuda_available=True) == "cuda:0"
        assert caplog.records == []
        assert actor_device(["1"], cuda_available=False) == "cpu"
    (record,) = caplog.records
    assert "GPU 1" in record.getMessage() and "CPU" in record.getMessage()
    assert "\n" not in record.getMessage()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")  # Ray told not to set it: the id itself names the device
    assert actor_device([1], cuda_available=True) == "cuda:1"
    assert actor_device(["0"]) == ("cuda:0" if CUDA else "cpu")  # asks torch


def test_default_worker_count_fits_both_the_gpus_and_the_cpus(ray_local):
    assert RayEngine(gpus_per_worker=1)._default_workers(ray) == 2
    # 2 GPUs hold 4 half-GPU actors, but 2 CPUs hold only 2 one-CPU actors (more would never start).
    assert RayEngine(gpus_per_worker=0.5)._default_workers(ray) == 2
    assert RayEngine(gpus_per_worker=0.5, cpus_per_worker=0.5)._default_workers(ray) == 4
    with pytest.raises(RayEngineError, match="fewer than --gpus-per-worker 3"):
        RayEngine(gpus_per_worker=3)._default_workers(ray)


@pytest.mark.parametrize("gpus", [1.0, 0.75])
def test_gpu_actors_each_get_their_own_gpu(ray_local, tiny_ckpt, gpus):
    engine = RayEngine(tiny_ckpt, GEN, workers=2, gpus_per_worker=gpus)
    try:
        engine.start()
        infos = engine.worker_devices()
    finally:
        engine.close()
    # Two actors of more than half a GPU each cannot share one of the 2 GPUs: Ray gives them one each.
    assert sorted(tuple(i["gpu_ids"]) for i in infos) == [("0",), ("1",)]
    assert len({i["pid"] for i in infos}) == 2
    for info in infos:
        assert info["cuda_visible_devices"] == info["gpu_ids"][0]  # Ray limits the actor to its GPU
        assert info["device"] == ("cuda:0" if CUDA else "cpu")


def test_half_gpu_actors_run_gives_the_local_engines_records(ray_local, tiny_ckpt, images, tmp_path):
    paths = [p for p in list_images(images) if p.name != "corrupt.jpg"][::7]  # 3 images
    assert len(paths) == 3
    gen = samkit.MaskGenerator(samkit.load(tiny_ckpt), output_mode="coco_rle", **GEN)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like each 1-CPU worker
    try:
        run_local(paths, gen, tmp_path / "local", progress=False)
    finally:
        torch.set_num_threads(threads)
    engine = RayEngine(tiny_ckpt, GEN, workers=2, batch_size=1, gpus_per_worker=0.5)
    try:
        summary = engine.run(paths, tmp_path / "ray", progress=False)
        infos = engine.worker_devices()
    finally:
        engine.close()

    assert summary.count("done") == 3
    expected = _outputs(tmp_path / "local")
    assert len(expected) == 3 and all(v["annotations"] for v in expected.values())
    assert _outputs(tmp_path / "ray") == expected
    # What Ray guarantees for half a GPU each: one GPU id per actor, at most 2 actors on one GPU.
    ids = [i["gpu_ids"] for i in infos]
    assert all(len(g) == 1 and g[0] in ("0", "1") for g in ids)
    assert all(sum(g == [gpu] for g in ids) <= 2 for gpu in ("0", "1"))
    assert all(i["device"] == ("cuda:0" if CUDA else "cpu") for i in infos)
    workers = {e["worker"] for e in read_manifest(tmp_path / "ray" / "manifest.jsonl")}
    assert workers <= {i["pid"] for i in infos}
