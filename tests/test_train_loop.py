"""The training loop end to end on CPU: learning, exact resume, decoder fine-tuning, distillation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATASETS, TINY_ARCH, TOY_TINY_VIT, tiny_train_config

import samkit
from samkit.train import read_metrics, train
from samkit.train.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_resume_continues_exactly(tmp_path):
    straight = train(tiny_train_config(tmp_path / "a"), progress=False)
    rows_a, _ = read_metrics(tmp_path / "a" / "metrics.jsonl")

    train(tiny_train_config(tmp_path / "b", optim={"steps": 3, "lr": 3.0e-4, "warmup": 2}), progress=False)
    resumed = train(tiny_train_config(tmp_path / "b"), resume=True, progress=False)
    rows_b, _ = read_metrics(tmp_path / "b" / "metrics.jsonl")

    assert [r["step"] for r in rows_b] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([r["loss"] for r in rows_b], [r["loss"] for r in rows_a], rtol=1e-5)
    a = samkit.load(straight["model"]).state_dict()
    b = samkit.load(resumed["model"]).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert (tmp_path / "a" / "curves.png").stat().st_size > 1000


def test_resume_refuses_a_different_config(tmp_path):
    train(tiny_train_config(tmp_path, optim={"steps": 2, "lr": 3.0e-4, "warmup": 2}), progress=False)
    with pytest.raises(ConfigError, match="differs"):
        train(tiny_train_config(tmp_path, seed=1), resume=True, progress=False)


def test_decoder_finetune_keeps_encoder_and_loads_in_reference(tmp_path, ref_checkpoint):
    ref, path = ref_checkpoint("vit_t")
    coco = DATASETS / "instances" / "coco_mini" / "train"
    cfg = {
        "out": str(tmp_path / "run"),
        "mode": "decoder",
        "model": {"init": str(path)},
        "data": {
            "train": [{"type": "coco", "path": str(coco), "range": [0, 2]}],
            "masks_per_image": 2,
            "batch_size": 1,
        },
        "recipe": {"rounds": 2},
        "optim": {"steps": 3, "lr": 1.0e-3, "warmup": 1},
        "val_every": 0,
        "export": {"name": "vit_t-test", "official_pth": True},
    }
    result = train(cfg, progress=False)
    original = torch.load(path, weights_only=True)
    tuned = samkit.load(result["model"])
    assert tuned.arch == "vit_t-test"
    sd = tuned.state_dict()
    enc = [k for k in original if k.startswith("image_encoder.")]
    dec = [k for k in original if k.startswith("mask_decoder.")]
    assert all(torch.equal(sd[k], original[k]) for k in enc)
    assert all(torch.equal(sd[k], original[k]) for k in original if k.startswith("prompt_encoder."))
    assert any(not torch.equal(sd[k], original[k]) for k in dec)
    # Embeddings were cached once per image, as Predictor embedding files.
    assert len(list((tmp_path / "run" / "embeddings").rglob("*.safetensors"))) == 2

    from safetensors.torch import load_file

    ref.load_state_dict(load_file(str(result["model"])), strict=True)
    ref.load_state_dict(torch.load(tmp_path / "run" / "model.pth", weights_only=True), strict=True)
    assert torch.equal(ref.mask_decoder.iou_token.weight, sd["mask_decoder.iou_token.weight"])


def _saved_teacher(tmp_path: Path, arch: dict = TINY_ARCH) -> Path:
    """A random teacher model of `arch` (seed 0) saved as tmp_path/t.safetensors."""
    torch.manual_seed(0)
    model = samkit.models.build.build_sam(samkit.models.build.SamConfig.from_dict(arch))
    return samkit.save(model, tmp_path / "t.safetensors")


def test_distillation_reduces_embedding_mse(tmp_path):
    teacher_path = _saved_teacher(tmp_path)
    cfg = tiny_train_config(
        tmp_path / "run",
        mode="distill",
        teacher=str(teacher_path),
        model={"init": "scratch", "arch": {**TOY_TINY_VIT, "encoder": "tiny_vit", "image_size": 128}},
        data={"train": [{"type": "synthetic", "count": 4, "size": 128}], "batch_size": 2},
        optim={"steps": 30, "lr": 2.0e-3, "warmup": 2},
        log_every=5,
    )
    result = train(cfg, progress=False)
    rows, _ = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["mse"] < 0.75 * rows[0]["mse"], [r["mse"] for r in rows]
    # Four images, one cached teacher embedding each.
    assert len(list((tmp_path / "run" / "embeddings").rglob("*.safetensors"))) == 4
    student = samkit.load(result["model"])
    assert student.config.encoder == "tiny_vit"
    teacher = samkit.load(teacher_path)
    assert torch.equal(student.mask_decoder.iou_token.weight, teacher.mask_decoder.iou_token.weight)


def test_online_teacher_distils_from_an_image_folder(tmp_path):
    """teacher_online: no embedding cache; the teacher sees each step's augmented batch; images need no masks."""
    from PIL import Image

    teacher_path = _saved_teacher(tmp_path)
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        pixels = rng.integers(0, 255, (40 + 8 * k, 64, 3), dtype=np.uint8).repeat(2, 0).repeat(2, 1)
        Image.fromarray(pixels).save(folder / f"p{k}.png")
    (folder / "notes.txt").write_text("not an image")
    cfg = tiny_train_config(
        tmp_path / "run",
        mode="distill",
        teacher=str(teacher_path),
        teacher_online=True,
        model={"init": "scratch", "arch": {**TINY_ARCH, "embed_dim": 16}},
        data={
            "train": [{"type": "images", "path": str(folder)}],
            "batch_size": 2,
            "augment": {"scale": [0.7, 1.3], "hflip": 0.5, "color": 0.2},
        },
        optim={"steps": 30, "lr": 3.0e-3, "warmup": 2},
        log_every=5,
    )
    result = train(cfg, progress=False)
    rows, _ = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["mse"] < 0.75 * rows[0]["mse"], [r["mse"] for r in rows]
    assert not (tmp_path / "run" / "embeddings").exists()
    assert samkit.load(result["model"]).config.embed_dim == 16


@pytest.mark.parametrize("preprocess", [{}, {"normalize": "minmax", "resize": "area"}])
def test_training_feeds_the_encoders_what_inference_does(tmp_path, preprocess):
    """A non-square image reaches the student's and the teacher's encoder exactly as the Predictor sends
    it: resized by the model's interpolation, normalised, then padded with zeros."""
    from PIL import Image

    from samkit.train.config import load_config
    from samkit.train.loop import Trainer

    arch = {**TINY_ARCH, **preprocess}
    teacher_path = _saved_teacher(tmp_path, arch)
    folder = tmp_path / "photos"
    folder.mkdir()
    photo = np.random.default_rng(0).integers(0, 256, (90, 200, 3), dtype=np.uint8)
    Image.fromarray(photo).save(folder / "wide.png")
    cfg = tiny_train_config(
        tmp_path / "run",
        mode="distill",
        teacher=str(teacher_path),
        teacher_online=True,
        model={"init": "scratch", "arch": arch},
        data={"train": [{"type": "images", "path": str(folder)}], "batch_size": 1},
    )
    trainer = Trainer(load_config(cfg), progress=False)
    seen: dict[str, torch.Tensor] = {}
    for name, model in (("student", trainer.model), ("teacher", trainer.teacher)):
        model.image_encoder.register_forward_pre_hook(
            lambda _, args, name=name: seen.__setitem__(name, args[0].detach().clone())
        )
    trainer.distillation.loss(trainer.drawer(np.random.default_rng(0)))
    training = dict(seen)
    samkit.Predictor(trainer.model).set_image(photo)
    inference = seen["student"]
    assert inference.shape == (1, 3, 128, 128) and not inference[..., 58:, :].any()
    assert torch.equal(training["student"], inference)
    assert torch.equal(training["teacher"], inference)


def test_image_folders_only_serve_distillation(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ConfigError, match="only train mode distill"):
        train(
            tiny_train_config(tmp_path / "run", data={"train": [{"type": "images", "path": str(tmp_path)}]})
        )


def test_cli_train_runs_a_config(tmp_path, capsys):
    from samkit.cli import main

    cfg = tiny_train_config(tmp_path / "run", optim={"steps": 2, "lr": 3.0e-4, "warmup": 1})
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    assert main(["train", str(path), "--set", "recipe.rounds=1", "--out", str(tmp_path / "cli")]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    assert main(["train", str(path), "--set", "nope=1"]) == 2


def test_cli_names_an_interrupt_that_brings_no_message(monkeypatch, capsys):
    from samkit import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_train", interrupted)
    assert cli.main(["train", "c.yaml"]) == 130
    assert capsys.readouterr().err == "samkit: interrupted\n"


def test_tiny_model_learns_single_point_segmentation(tmp_path):
    """A tiny SAM from scratch, the full recipe (3 rounds here), a small synthetic set, CPU: the single-point
    mIoU (samkit.eval's protocol) on that set rises clearly above its value at step 0."""
    scenes = {"type": "synthetic", "count": 4, "size": 128, "max_shapes": 2, "textured": False}
    cfg = tiny_train_config(tmp_path, log_every=20, val_every=120, val_objects=10)
    cfg["data"].update(train=[scenes], val=scenes)
    cfg["optim"] = {"steps": 120, "lr": 3.0e-4, "warmup": 10}
    result = train(cfg, progress=False)
    _, val = read_metrics(tmp_path / "metrics.jsonl")
    first, last = val[0]["val"], val[-1]["val"]
    assert val[0]["step"] == 0 and val[-1]["step"] == 120
    assert last["mIoU_top"] > 0.25 and last["mIoU_top"] > first["mIoU_top"] + 0.15, (first, last)
    assert result["val"] == last


def _train_in_child(cfg: dict, ready: Callable[[], bool]) -> subprocess.Popen:
    """`samkit train` on `cfg` in a child process of its own session (one OpenMP thread, stderr piped);
    returns once `ready()` holds, the child has ended, or 180 s have passed."""
    path = Path(cfg["out"] + ".yaml")
    path.write_text(json.dumps(cfg))  # JSON is YAML
    code = "import sys; from samkit.cli import main; sys.exit(main())"
    child = subprocess.Popen(
        [sys.executable, "-c", code, "train", str(path)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and child.poll() is None and not ready():
        time.sleep(0.05)
    return child


def _has_rows(metrics: Path, n: int) -> Callable[[], bool]:
    return lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= n


@pytest.mark.parametrize(
    ("send", "signum", "exit_code", "stopped"),
    [
        (os.killpg, signal.SIGINT, 130, "interrupted"),
        (os.kill, signal.SIGTERM, 143, "terminated (SIGTERM)"),
        (os.killpg, signal.SIGTERM, 143, "terminated (SIGTERM)"),
    ],
    ids=["ctrl-c", "sigterm", "sigterm-to-group"],
)
def test_a_stop_signal_finishes_the_step_saves_and_resume_matches_a_straight_run(
    tmp_path, send, signum, exit_code, stopped
):
    """`samkit train` in a child process with worker processes; after a few steps Ctrl-C (SIGINT to the
    whole process group, workers included, as a terminal sends it) or SIGTERM to the training process (as
    `kill PID` or docker stop sends it) or to its whole group (as SLURM sends it): exit 128 + the signal's number with one line naming the checkpoint,
    which holds the last finished step; --resume then continues with the losses and weights of an
    uninterrupted run."""
    cfg = tiny_train_config(tmp_path / "run", log_every=1, checkpoint_every=1000)
    cfg["optim"]["steps"] = 1000
    cfg["data"]["workers"] = 2
    metrics = tmp_path / "run" / "metrics.jsonl"
    child = _train_in_child(cfg, _has_rows(metrics, 3))
    send(child.pid, signum)
    _, err = child.communicate(timeout=120)
    assert child.returncode == exit_code, err
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    saved = torch.load(ckpt, weights_only=False)["step"]
    said = [line for line in err.splitlines() if line.startswith("samkit:")]
    assert said == [f"samkit: {stopped} at step {saved}; saved {ckpt}; continue with --resume"], err
    rows, _ = read_metrics(metrics)
    assert 3 <= saved < 1000 and [r["step"] for r in rows] == list(range(1, saved + 1))

    steps = {"steps": saved + 2, "lr": 3.0e-4, "warmup": 2}
    resumed = train(tiny_train_config(tmp_path / "run", optim=steps), resume=True, progress=False)
    straight = train(tiny_train_config(tmp_path / "straight", optim=steps), progress=False)
    rows_r, _ = read_metrics(metrics)
    rows_s, _ = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert [r["step"] for r in rows_r] == [r["step"] for r in rows_s] == list(range(1, saved + 3))
    np.testing.assert_allclose([r["loss"] for r in rows_r], [r["loss"] for r in rows_s], rtol=1e-5)
    a = samkit.load(straight["model"]).state_dict()
    b = samkit.load(resumed["model"]).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_ctrl_c_while_caching_embeddings_keeps_them_and_the_same_command_continues(tmp_path, monkeypatch):
    """Ctrl-C during precache (before step 1): exit 130 with one line saying the cache is kept; each kept
    entry is whole, and the same command again encodes only the images still missing."""
    from safetensors.torch import load_file

    from samkit.train import embeddings, load_config, loop

    count = 150
    cfg = tiny_train_config(tmp_path / "run", mode="decoder")
    cfg["data"].update(train=[{"type": "synthetic", "count": count, "size": 128}], precache=True)
    cache = tmp_path / "run" / "embeddings"
    child = _train_in_child(cfg, lambda: any(cache.glob("*/*.safetensors")))
    os.killpg(child.pid, signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    said = [line for line in err.splitlines() if line.startswith("samkit:")]
    assert said == [
        "samkit: interrupted while caching embeddings; the cached ones are kept: "
        "run the same command again to continue"
    ], err
    kept = {p: p.stat().st_mtime_ns for p in cache.glob("*/*.safetensors")}
    assert 0 < len(kept) < count
    assert all(load_file(str(p))["embedding"].shape == (1, 256, 8, 8) for p in kept)

    encoded = []
    encode = embeddings.encode_input_frame
    monkeypatch.setattr(
        embeddings, "encode_input_frame", lambda pred, image: encoded.append(1) or encode(pred, image)
    )
    loop.Trainer(load_config(cfg), progress=False).precache()
    assert len(encoded) == count - len(kept)
    assert len(list(cache.glob("*/*.safetensors"))) == count
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())


def test_worker_processes_change_nothing(tmp_path):
    """data.workers 0 and 2: the same losses step for step (batches are a function of (seed, step))."""
    aug = {"scale": [0.7, 1.3], "hflip": 0.5, "color": 0.2}
    runs = []
    for workers in (0, 2):
        cfg = tiny_train_config(tmp_path / f"w{workers}", log_every=1)
        cfg["optim"]["steps"] = 4
        cfg["data"].update(workers=workers, augment=aug)
        train(cfg, progress=False)
        runs.append(read_metrics(tmp_path / f"w{workers}" / "metrics.jsonl")[0])
    assert [r["step"] for r in runs[0]] == [1, 2, 3, 4]
    for key in ("loss", "iou_first", "iou_last"):
        np.testing.assert_allclose([r[key] for r in runs[0]], [r[key] for r in runs[1]], rtol=1e-6)


def test_bf16_autocast_on_cpu(tmp_path):
    """amp: bf16 runs the recipe under CPU autocast (the CUDA path differs only in the device type)."""
    from samkit.train.config import load_config
    from samkit.train.loop import Trainer

    trainer = Trainer(
        load_config(tiny_train_config(tmp_path, amp="bf16", optim={"steps": 2, "lr": 3.0e-4, "warmup": 1}))
    )
    assert trainer.precision.dtype == torch.bfloat16 and not trainer.precision.scaler.is_enabled()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    stats = [trainer.train_step() for _ in range(2)]
    assert all(np.isfinite(s["loss"]) for s in stats)
    after = trainer.model.state_dict()
    assert all(after[k].dtype == torch.float32 for k in after if after[k].is_floating_point())
    assert any(not torch.equal(before[k], after[k]) for k in after)


def _running(pid: str) -> bool:
    """A live (not zombie) process; Linux /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="reads worker ids from Linux /proc")
def test_worker_processes_die_with_a_killed_training_process(tmp_path):
    """SIGKILL the training process: its data workers go too (they could block for good on a full pipe)."""
    cfg = tiny_train_config(tmp_path / "run", log_every=1)
    cfg["optim"]["steps"] = 1000
    cfg["data"]["workers"] = 2
    child = _train_in_child(cfg, _has_rows(tmp_path / "run" / "metrics.jsonl", 1))
    workers = Path(f"/proc/{child.pid}/task/{child.pid}/children").read_text().split()
    assert len(workers) == 2
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_running(w) for w in workers):
        time.sleep(0.2)
    assert not any(_running(w) for w in workers)
