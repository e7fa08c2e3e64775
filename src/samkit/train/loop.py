"""The training loop: a Trainer that puts together the parts a config names and runs them step by step.

The parts, one job per module: setup (device, precision, the model per mode), optim (AdamW groups and the
lr schedule), embeddings (the cache of a frozen encoder), recipe (the interactive loss), distill (teacher
targets), validation, checkpoint, export, metrics (metrics.jsonl and curves.png), signals (Ctrl-C / SIGTERM).

Every random choice of step s (which images, which masks, which prompts, augmentation) is drawn from
`numpy.random.default_rng([seed, s])`, so the data position of a run is its step number and `--resume`
continues exactly where a checkpoint left off.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samkit.train.checkpoint import read_checkpoint, restore_rng, rng_state, save_checkpoint
from samkit.train.config import TrainConfig, load_config
from samkit.train.data import Batch, BatchDrawer, Mix, Source, build_source, step_batches
from samkit.train.distill import Distillation, load_teacher
from samkit.train.embeddings import EmbeddingCache, batch_embeddings, precache
from samkit.train.export import export_model
from samkit.train.metrics import append_row, plot_curves, truncate_metrics
from samkit.train.optim import build_optimizer, lr_factor
from samkit.train.recipe import InteractiveLoss
from samkit.train.setup import Precision, build_model, freeze_batchnorm, set_trainable
from samkit.train.signals import StopOnSignals, TrainingInterrupted, stopped_by
from samkit.train.validation import validate
from samkit.transforms import ImagePipeline

CACHED_MODES = ("decoder", "distill")


class Trainer:
    """Builds everything a TrainConfig describes; `run()` trains, validates, checkpoints and exports.

    Outputs in `out/`: checkpoints/last.pt (resumable state), metrics.jsonl, curves.png,
    model.safetensors (the result, opened by `samkit.load`) and, if asked, model.pth (official keys).
    """

    def __init__(self, cfg: TrainConfig, progress: bool = True) -> None:
        self.cfg, self.progress = cfg, progress
        self.out, self.seed, self.mode = Path(cfg.out), cfg.seed, cfg.mode
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.precision = Precision.of(cfg.device, cfg.amp)
        self.device = self.precision.device
        torch.manual_seed(self.seed)
        self.model = build_model(cfg, self.device)
        self.teacher = (
            load_teacher(cfg.teacher, self.model, self.device)
            if cfg.teacher and self.mode == "distill"
            else None
        )
        set_trainable(self.model, self.mode, cfg.model.freeze)
        self.pipeline = ImagePipeline.of(self.model)
        base = Path.cwd()
        self.sources: list[Source] = [build_source(s, base) for s in cfg.data.train]
        self.mix = Mix(self.sources, [float(s.get("weight", 1.0)) for s in cfg.data.train])
        self.val_source = build_source(cfg.data.val, base) if cfg.data.val else None
        self.steps = cfg.optim.steps
        if cfg.optim.epochs:
            self.steps = math.ceil(cfg.optim.epochs * len(self.mix) / cfg.data.batch_size)
        self.cache = None
        if self.mode in CACHED_MODES and not (self.mode == "distill" and cfg.teacher_online):
            cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else self.out / "embeddings"
            self.cache = EmbeddingCache(self.teacher or self.model, cache_dir)
        self.drawer = BatchDrawer(
            self.sources,
            self.mix,
            cfg.data,
            self.seed,
            self.model.image_size,
            cached=self.cache is not None,
            needs_masks=self.mode != "distill",
            resize=self.model.resize,
        )
        self.optimizer, self.scheduler = build_optimizer(self.model, self.mode, cfg.optim)
        self.recipe = InteractiveLoss(self.model, self.pipeline, cfg.recipe, self.precision)
        self.distillation = (
            Distillation(self.model, self.teacher, self.cache, self.precision)
            if self.teacher is not None
            else None
        )
        self.step = 0

    def precache(self) -> int:
        """Encode every (training image, cache variant) and, in decoder mode, every validation image into
        the embedding cache now, instead of on first use; returns how many images were looked at."""
        if self.cache is None:
            return 0
        val = self.val_source if self.mode == "decoder" else None
        return precache(self.cache, self.drawer, val, self.progress)

    def train_step(self, drawn: tuple[Batch, np.random.Generator] | None = None) -> dict[str, float]:
        """One optimisation step at `self.step`; returns its logged values.

        `drawn`: the step's batch and generator from `step_batches` (drawn here when None)."""
        if drawn is None:
            rng = np.random.default_rng([self.seed, self.step])
            drawn = self.drawer(rng), rng
        batch, rng = drawn
        self.model.train()
        freeze_batchnorm(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.precision.scaler
        if self.distillation is not None:
            loss, stats = self.distillation.loss(batch)
            scaler.scale(loss).backward()
        else:
            with self.precision.autocast():
                emb = batch_embeddings(
                    batch, self.model, self.pipeline, self.cache, frozen=self.mode == "frozen_encoder"
                )
            loss, stats = self.recipe.backward(emb, batch, rng)
        if self.cfg.optim.clip > 0:
            scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], self.cfg.optim.clip
            )
        scaler.step(self.optimizer)
        scaler.update()
        stats["lr"] = self.cfg.optim.lr * lr_factor(self.cfg.optim, self.step)
        self.scheduler.step()
        self.step += 1
        return {"loss": float(loss.detach()), **stats}

    def validate(self, max_objects: int | None = None) -> dict[str, float]:
        """The single-point protocol (samkit.eval) on the held-out source: mIoU top-1, oracle, single."""
        if self.val_source is None:
            return {}
        cache = self.cache if self.mode == "decoder" else None
        limit = max_objects or self.cfg.val_objects
        return validate(self.model, self.val_source, limit, self.cfg.val_per_image, cache)

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.precision.scaler.state_dict(),
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
        }

    def save_checkpoint(self) -> Path:
        """Write checkpoints/last.pt atomically (temp file + rename)."""
        return save_checkpoint(self.out / "checkpoints" / "last.pt", self.state())

    def load_checkpoint(self, path: Path) -> None:
        st = read_checkpoint(path, self.device, self.cfg.to_dict())
        self.model.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.precision.scaler.load_state_dict(st["scaler"])
        restore_rng(st["rng"])
        self.step = int(st["step"])

    def export(self) -> Path:
        """Write out/model.safetensors (samkit.load opens it); LoRA is merged into the encoder first."""
        return export_model(self.model, self.mode, self.out, self.cfg.export)

    # --- the run -------------------------------------------------------------------------------------

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Train to `optim.steps`; returns {"model": export path, "val": last validation, "steps": n}."""
        from tqdm import tqdm

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        metrics = self.out / "metrics.jsonl"
        if resume:
            self.load_checkpoint(self.out / "checkpoints" / "last.pt")
            truncate_metrics(metrics, self.step)
        else:
            metrics.write_text("")
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        if cfg.data.precache:
            self._precache_or_stop()
        val: dict[str, float] = {}
        if not resume and self.val_source is not None and cfg.val_every > 0:
            val = self._log_val(metrics)
        bar = tqdm(
            total=self.steps,
            initial=self.step,
            desc=f"train {self.mode}",
            unit="step",
            disable=not self.progress,
            file=sys.stderr,
        )
        window: list[dict[str, float]] = []
        t0 = time.perf_counter()
        batches = step_batches(self.drawer, self.step, self.steps, cfg.data.workers)
        with StopOnSignals() as stop:
            for drawn in batches:
                if stop.requested:
                    break
                window.append(self.train_step(drawn))
                bar.update(1)
                bar.set_postfix(loss=f"{window[-1]['loss']:.4f}")
                if self.step % cfg.log_every == 0 or self.step == self.steps or stop.requested:
                    self._log_window(metrics, window, time.perf_counter() - t0)
                    window, t0 = [], time.perf_counter()
                if cfg.checkpoint_every > 0 and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if (
                    cfg.val_every > 0
                    and self.step % cfg.val_every == 0
                    and self.step < self.steps
                    and not stop.requested
                ):
                    val = self._log_val(metrics)
            batches.close()  # stops the worker processes
        bar.close()
        if stop.requested and self.step < self.steps:
            path = self.save_checkpoint()
            raise TrainingInterrupted(
                f"{stopped_by(stop.signum)} at step {self.step}; saved {path}; continue with --resume",
                stop.signum,
            )
        self.save_checkpoint()
        if self.val_source is not None:
            val = self._log_val(metrics)
        plot_curves(metrics, self.out / "curves.png")
        return {"model": self.export(), "val": val, "steps": self.step, "out": self.out}

    def _precache_or_stop(self) -> None:
        # Each cache entry is written whole or not at all (temp file + rename), so a stop here keeps
        # what was encoded and the same command continues from there.
        with StopOnSignals(at_once=True) as stop:
            try:
                self.precache()
            except KeyboardInterrupt:
                raise TrainingInterrupted(
                    f"{stopped_by(stop.signum)} while caching embeddings; the cached ones are kept: "
                    "run the same command again to continue",
                    stop.signum,
                ) from None

    def _log_window(self, metrics: Path, window: list[dict[str, float]], seconds: float) -> None:
        row = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
        row["sec_per_step"] = seconds / len(window)
        if self.device.type == "cuda":
            row["cuda_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        append_row(metrics, {"step": self.step, **row})

    def _log_val(self, metrics: Path) -> dict[str, float]:
        val = self.validate()
        append_row(metrics, {"step": self.step, "val": val})
        return val


def train(
    config: str | Path | dict[str, Any] | TrainConfig | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    resume: bool = False,
    progress: bool = True,
    **values: Any,
) -> dict[str, Any]:
    """Train from a YAML config (or a config dict, or a TrainConfig) with `key=value` overrides; see
    `Trainer.run`."""
    return Trainer(load_config(config, overrides, **values), progress=progress).run(resume=resume)
