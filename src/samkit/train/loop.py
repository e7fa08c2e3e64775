"""The training loop: model set-up per mode, the interactive recipe, checkpoints, validation, export.

Every random choice of step s (which images, which masks, which prompts, augmentation) is drawn from
`numpy.random.default_rng([seed, s])`, so the data position of a run is its step number and `--resume`
continues exactly where a checkpoint left off.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samkit import embedding_file
from samkit.embedding_file import EncoderId, fingerprint
from samkit.errors import CheckpointError, MissingExtraError
from samkit.extras import require
from samkit.formats import atomic_write_bytes
from samkit.models.build import SamConfig, build_sam
from samkit.models.nano import warm_start
from samkit.models.sam import Sam
from samkit.predictor import Predictor
from samkit.train.config import ConfigError, load_config
from samkit.train.data import (
    Batch,
    BatchDrawer,
    Mix,
    Sample,
    Source,
    build_source,
    step_batches,
    to_input_frame,
)
from samkit.train.lora import add_lora, merge_lora
from samkit.train.losses import sam_loss
from samkit.train.prompts import error_points, first_points, jittered_boxes, round_plan
from samkit.transforms import ImagePipeline

CACHED_MODES = ("decoder", "distill")
# Keys that may change between a run and its resume without changing the result up to the old end.
_RESUMABLE_CHANGES = {
    "optim.steps",
    "optim.epochs",
    "log_every",
    "checkpoint_every",
    "val_every",
    "out",
    "data.workers",
}


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# --- embedding cache --------------------------------------------------------------------------------------


class EmbeddingCache:
    """Image embeddings of a frozen encoder on disk, one embedding file per (image, variant).

    Files live in `root/<encoder fingerprint>/` (`samkit.embedding_file.fingerprint`), so a changed
    encoder never reuses stale embeddings and several runs (or configs) can share one cache folder.
    """

    def __init__(self, model: Sam, root: Path, max_memory_items: int = 64) -> None:
        self.predictor = Predictor(model)
        self.root = root / fingerprint(model)
        self.root.mkdir(parents=True, exist_ok=True)
        self.encoder = EncoderId.of(model)
        self.memory: dict[str, torch.Tensor] = {}
        self.max_memory_items = max_memory_items

    def path(self, key: str, encode: Callable[[Predictor], None]) -> Path:
        """The embedding file of `key`, calling `encode(predictor)` (which sets the image) if missing."""
        path = self.root / (hashlib.sha1(key.encode()).hexdigest()[:20] + ".safetensors")
        if not path.is_file():
            encode(self.predictor)
            self.predictor.save_embedding(path)
        return path

    def get(self, key: str, image: Callable[[], np.ndarray]) -> torch.Tensor:
        """(1, 256, g, g) embedding of the input-frame image `image()` (h, w, 3) uint8, longest side <= S."""
        if key in self.memory:
            return self.memory[key]

        path = self.path(key, lambda p: _encode(p, image()))
        emb = torch.from_numpy(embedding_file.load(path, self.encoder)[0])
        if len(self.memory) < self.max_memory_items:
            self.memory[key] = emb
        return emb


def _encode(pred: Predictor, image: np.ndarray) -> None:
    """Set an input-frame image (h, w, 3) uint8, longest side <= S, on the predictor."""
    x = torch.tensor(image, device=pred.model.device).permute(2, 0, 1)[None]
    pred.set_torch_image(x, image.shape[:2])


# --- the trainer ------------------------------------------------------------------------------------------


class Trainer:
    """Builds everything a config describes; `run()` trains, validates, checkpoints and exports.

    Outputs in `out/`: checkpoints/last.pt (resumable state), metrics.jsonl, curves.png,
    model.safetensors (the result, opened by `samkit.load`) and, if asked, model.pth (official keys).
    """

    def __init__(self, cfg: dict[str, Any], progress: bool = True) -> None:
        self.cfg = cfg
        self.progress = progress
        self.out = Path(cfg["out"])
        self.seed = int(cfg["seed"])
        if cfg["threads"]:
            torch.set_num_threads(int(cfg["threads"]))
        self.device = self._device(cfg["device"])
        self.mode = cfg["mode"]
        torch.manual_seed(self.seed)
        self.model = self._build_model()
        self.teacher = self._build_teacher() if self.mode == "distill" else None
        self._set_trainable()
        self.image_size = self.model.image_size
        self.pipeline = ImagePipeline.of(self.model)
        data = cfg["data"]
        base = Path.cwd()
        specs = data["train"] if isinstance(data["train"], list) else [data["train"]]
        self.sources: list[Source] = [build_source(s, base) for s in specs]
        self.mix = Mix(self.sources, [float(s.get("weight", 1.0)) for s in specs])
        self.val_source = build_source(data["val"], base) if data["val"] else None
        opt = cfg["optim"]
        self.steps = int(opt["steps"])
        if opt["epochs"]:
            self.steps = math.ceil(float(opt["epochs"]) * len(self.mix) / int(data["batch_size"]))
        self.cache = None
        if self.mode in CACHED_MODES and not (self.mode == "distill" and cfg["teacher_online"]):
            encoder_model = self.teacher if self.teacher is not None else self.model
            cache_dir = Path(data["cache_dir"]) if data["cache_dir"] else self.out / "embeddings"
            self.cache = EmbeddingCache(encoder_model, cache_dir)
        self.drawer = BatchDrawer(
            self.sources,
            self.mix,
            data,
            self.seed,
            self.image_size,
            cached=self.cache is not None,
            needs_masks=self.mode != "distill",
            resize=self.model.resize,
        )
        self.optimizer = torch.optim.AdamW(self._param_groups(), betas=tuple(opt["betas"]))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.amp_dtype = self._amp_dtype(cfg["amp"])
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step = 0

    # --- set-up --------------------------------------------------------------------------------------

    @staticmethod
    def _device(name: str) -> torch.device:
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {name} asked for but CUDA is not available; use device: cpu or auto")
        return torch.device(name)

    def _amp_dtype(self, amp: str) -> torch.dtype | None:
        if amp == "off" or (amp == "auto" and self.device.type != "cuda"):
            return None
        if amp == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if amp == "bf16" else torch.float16

    def _build_model(self) -> Sam:
        import samkit

        spec = self.cfg["model"]
        if spec["arch"]:
            try:
                model = build_sam(SamConfig.from_dict(dict(spec["arch"])))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"model.arch is not a valid architecture: {exc}") from None
            model.arch = "custom"
            if spec["init"] != "scratch":
                # A new architecture warm-started from a checkpoint's matching tensors (samkit-nano).
                warm_start(model, samkit.load(spec["init"], dtype="fp32"))
        else:
            # fp32 whatever the CPU: the config's `amp` decides the training precision.
            model = samkit.load(spec["init"], dtype="fp32")
        if self.mode == "lora":
            lora = self.cfg["lora"]
            n = add_lora(model.image_encoder, int(lora["rank"]), float(lora["alpha"]), list(lora["targets"]))
            if n == 0:
                raise ConfigError(f"lora.targets {lora['targets']} match no nn.Linear in the image encoder")
        return model.to(self.device)

    def _build_teacher(self) -> Sam:
        import samkit

        teacher = samkit.load(self.cfg["teacher"], device=self.device, dtype="fp32")
        if teacher.image_size != self.model.image_size:
            raise ConfigError(
                f"teacher input size {teacher.image_size} differs from the student's {self.model.image_size}"
            )
        # The student inherits the teacher's prompt encoder and decoder (MobileSAM's decoupled distillation).
        self.model.prompt_encoder.load_state_dict(teacher.prompt_encoder.state_dict())
        self.model.mask_decoder.load_state_dict(teacher.mask_decoder.state_dict())
        return teacher.requires_grad_(False).eval()

    def _set_trainable(self) -> None:
        m = self.model
        m.requires_grad_(self.mode in ("scratch", "full"))
        if self.mode in ("decoder", "frozen_encoder", "lora"):
            m.mask_decoder.requires_grad_(True)
        if self.mode in ("frozen_encoder", "lora"):
            m.prompt_encoder.requires_grad_(True)
        if self.mode == "lora":
            for name, p in m.image_encoder.named_parameters():
                p.requires_grad_("lora_" in name)
        if self.mode == "distill":
            m.image_encoder.requires_grad_(True)
        for name, p in m.named_parameters():
            if any(name.startswith(prefix) for prefix in self.cfg["model"]["freeze"]):
                p.requires_grad_(False)

    def _param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: no weight decay on 1-D tensors; layer-wise lr decay on a fine-tuned encoder."""
        opt = self.cfg["optim"]
        decay = float(opt["layer_decay"]) if self.mode in ("full", "lora") else 1.0
        scales = _layer_scales(self.model.image_encoder, decay)
        groups: dict[tuple[float, float], list[nn.Parameter]] = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            scale = (
                scales.get(name.removeprefix("image_encoder."), 1.0)
                if name.startswith("image_encoder.")
                else 1.0
            )
            wd = 0.0 if p.ndim <= 1 else float(opt["weight_decay"])
            groups.setdefault((scale, wd), []).append(p)
        if not groups:
            raise ConfigError(f"mode {self.mode} leaves no trainable parameter")
        lr = float(opt["lr"])
        return [{"params": ps, "lr": lr * s, "weight_decay": wd} for (s, wd), ps in groups.items()]

    def _lr_factor(self, step: int) -> float:
        opt = self.cfg["optim"]
        warm = int(opt["warmup"])
        factor = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
        factor *= float(opt["decay_factor"]) ** sum(step >= int(s) for s in opt["decay_steps"])
        return factor

    # --- data ----------------------------------------------------------------------------------------

    def precache(self) -> int:
        """Encode every (training image, cache variant) and, in decoder mode, every validation image into
        the embedding cache now, instead of on first use; returns how many images were looked at."""
        from tqdm import tqdm

        if self.cache is None:
            return 0
        data = self.cfg["data"]
        variants = int(data["cache_variants"])
        jobs = [
            (s, i, v) for s, src in enumerate(self.sources) for i in range(len(src)) for v in range(variants)
        ]
        val = self.val_source if self.mode == "decoder" else None
        total = len(jobs) + (len(val) if val is not None else 0)
        with tqdm(  # closed on an interrupt too, so that the CLI's message starts a line of its own
            total=total, desc="caching embeddings", unit="img", disable=not self.progress, file=sys.stderr
        ) as bar:
            for s, i, v in jobs:
                sample = self.sources[s][i]
                key, params = self.drawer.variant(s, i, v, sample)
                image = to_input_frame(
                    sample.image, sample.masks[:0], self.image_size, params, self.model.resize
                )[0]
                self.cache.path(key, lambda p, img=image: _encode(p, img))
                bar.update(1)
            for i in range(len(val) if val is not None else 0):
                self._val_embedding_path(val[i])
                bar.update(1)
        return total

    def _val_embedding_path(self, sample: Sample) -> Path:
        assert self.cache is not None
        return self.cache.path(f"val:{sample.key}", lambda p, s=sample: p.set_image(s.image))

    def _encoder_input(self, batch: Batch, pipeline: ImagePipeline) -> torch.Tensor:
        """(B, 3, S, S) encoder input of the batch's input-frame images by a model's image pipeline: the
        same normalise-then-pad as inference."""
        return torch.cat(
            [
                pipeline.to_input_torch(torch.tensor(img, device=self.device).permute(2, 0, 1)[None].float())
                for _, img, _ in batch
            ]
        )

    def _embeddings(self, batch: Batch) -> torch.Tensor:
        """(B, 256, g, g) image embeddings: from the cache, or the encoder (with grad if it trains)."""
        if self.cache is not None:
            embs = [self.cache.get(key, lambda img=img: img) for key, img, _ in batch]
            return torch.cat(embs).to(self.device)
        x = self._encoder_input(batch, self.pipeline)
        if self.mode == "frozen_encoder":
            with torch.no_grad():
                return self.model.image_encoder(x)
        return self.model.image_encoder(x)

    # --- one step ------------------------------------------------------------------------------------

    def _segmentation_loss(
        self, batch: Batch, rng: np.random.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The recipe's loss for one batch, backpropagated (into .grad) round by round; returns it detached.

        Rounds share only the image embedding (each round's mask_input is detached), so each round's graph
        is freed as soon as its loss is known: memory holds one round, not 11 (the default decoder config
        needed ~19 GB on CPU otherwise). An encoder that trains gets its gradient once, at the end, from
        the gradient accumulated on a detached copy of the embedding."""
        with self._autocast():
            emb = self._embeddings(batch)
        leaf = emb.detach().requires_grad_(emb.requires_grad)
        totals: dict[str, float] = {}
        loss = torch.zeros((), device=self.device)
        n_masks = sum(len(m) for _, _, m in batch)
        for b, (_, _, masks) in enumerate(batch):
            is_point = rng.random(len(masks)) < float(self.cfg["recipe"]["point_prob"])
            for point_first, group in ((True, is_point), (False, ~is_point)):
                if not group.any():
                    continue
                share = int(group.sum()) / n_masks
                g_loss, g_stats = self._rounds(leaf[b : b + 1], masks[group], point_first, rng, share)
                loss = loss + g_loss * share
                for k, v in g_stats.items():
                    totals[k] = totals.get(k, 0.0) + v * share
        if leaf.grad is not None:
            emb.backward(leaf.grad)
        return loss, totals

    def _rounds(
        self,
        emb: torch.Tensor,
        masks_np: np.ndarray,
        point_first: bool,
        rng: np.random.Generator,
        weight: float = 1.0,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The simulated interactive session for M masks of one image; loss averaged over rounds, each
        round's share (x `weight`) backpropagated at once. Returns the loss detached.

        emb: (1, 256, g, g); masks_np: (M, h, w) bool in the input frame.
        """
        recipe = self.cfg["recipe"]
        pe, dec = self.model.prompt_encoder, self.model.mask_decoder
        masks = torch.from_numpy(masks_np).to(self.device).float()
        gt = self.pipeline.pad_torch(masks)[:, None]  # (M, 1, S, S)
        low_size = pe.mask_input_size
        gt_low = (F.interpolate(gt, size=low_size, mode="area") > 0.5).float()
        target = gt_low if recipe["loss_resolution"] == "low" else gt
        stride = self.image_size / low_size[0]
        if point_first:
            coords = torch.from_numpy(first_points(masks_np, rng)).to(self.device)
            labels = torch.ones(coords.shape[:2], dtype=torch.int64, device=self.device)
            box = None
        else:
            box_np = jittered_boxes(masks_np, rng, float(recipe["box_noise"]), float(recipe["box_noise_max"]))
            box = torch.from_numpy(box_np).to(self.device)
            coords = torch.zeros((len(masks_np), 0, 2), device=self.device)
            labels = torch.zeros((len(masks_np), 0), dtype=torch.int64, device=self.device)
        mask_input = prev = None
        total = torch.zeros((), device=self.device)
        stats: dict[str, float] = {}
        plan = round_plan(int(recipe["rounds"]), rng)
        dense_pe = pe.get_dense_pe()
        for r, new_point in enumerate(plan):
            if new_point and prev is not None:
                c, lab = error_points(prev > 0, gt_low[:, 0] > 0.5, stride, rng)
                coords = torch.cat([coords, torch.from_numpy(c).to(self.device)], 1)
                labels = torch.cat([labels, torch.from_numpy(lab).to(self.device)], 1)
            points = (coords, labels) if coords.shape[1] else None
            multimask = coords.shape[1] == 1 and box is None and mask_input is None
            with self._autocast():
                sparse, dense = pe(points, box, mask_input)
                logits, iou_pred = dec(emb, dense_pe, sparse, dense, multimask)
            full = (
                logits
                if target is gt_low
                else F.interpolate(logits.float(), size=gt.shape[-2:], mode="bilinear")
            )
            loss, st, best = sam_loss(
                full,
                iou_pred,
                target,
                float(recipe["focal_weight"]),
                float(recipe["dice_weight"]),
                float(recipe["iou_weight"]),
            )
            self.scaler.scale(loss * (weight / len(plan))).backward()
            total = total + loss.detach() / len(plan)
            prev = logits[torch.arange(len(best)), best].detach().float()  # (M, h, w) low-res logits
            mask_input = prev[:, None]
            if r == 0:
                stats["iou_first"] = float(st["iou"])
            for k, v in st.items():
                stats[k] = stats.get(k, 0.0) + float(v) / len(plan)
        stats["iou_last"] = float(st["iou"])
        return total, stats

    def _distill_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        x = self._encoder_input(batch, self.pipeline)
        if self.cache is not None:
            target = self._embeddings(batch).float()  # the teacher's, from the cache
        else:  # teacher_online: the teacher sees the same augmented batch
            assert self.teacher is not None
            x_teacher = self._encoder_input(batch, ImagePipeline.of(self.teacher))
            with torch.no_grad(), self._autocast():
                target = self.teacher.image_encoder(x_teacher).float()
        with self._autocast():
            student = self.model.image_encoder(x)
        loss = F.mse_loss(student.float(), target)
        return loss, {"mse": float(loss.detach())}

    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, drawn: tuple[Batch, np.random.Generator] | None = None) -> dict[str, float]:
        """One optimisation step at `self.step`; returns its logged values.

        `drawn`: the step's batch and generator from `step_batches` (drawn here when None)."""
        if drawn is None:
            rng = np.random.default_rng([self.seed, self.step])
            drawn = self.drawer(rng), rng
        batch, rng = drawn
        self.model.train()
        _freeze_batchnorm(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        if self.mode == "distill":
            loss, stats = self._distill_loss(batch)
            self.scaler.scale(loss).backward()
        else:
            loss, stats = self._segmentation_loss(batch, rng)
        clip = float(self.cfg["optim"]["clip"])
        if clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], clip
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        stats["lr"] = float(self.cfg["optim"]["lr"]) * self._lr_factor(self.step)
        self.scheduler.step()
        self.step += 1
        return {"loss": float(loss.detach()), **stats}

    # --- validation -----------------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self, max_objects: int | None = None) -> dict[str, float]:
        """The single-point protocol (samkit.eval) on the held-out source: mIoU top-1, oracle, single."""
        from samkit.eval.datasets import ObjectItem
        from samkit.eval.protocols import single_point, summarize_single_point

        if self.val_source is None:
            return {}
        limit = int(max_objects or self.cfg["val_objects"])
        per_image = int(self.cfg["val_per_image"] or limit)
        self.model.eval()
        pred = Predictor(self.model)
        results = []
        for i in range(len(self.val_source)):
            if len(results) >= limit:
                break
            sample = self.val_source[i]
            if self.mode == "decoder" and self.cache is not None:
                pred.load_embedding(self._val_embedding_path(sample))
            else:
                pred.set_image(sample.image)
            for k, mask in enumerate(sample.masks[: min(per_image, limit - len(results))]):
                results.append(
                    single_point(pred, ObjectItem(f"{sample.key}:{k}", Path(sample.key), mask, None))
                )
        summary = summarize_single_point(results)
        summary["objects"] = len(results)
        return summary

    # --- state ----------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            "config": self.cfg,
        }

    def save_checkpoint(self) -> Path:
        """Write checkpoints/last.pt atomically (temp file + rename)."""
        buf = io.BytesIO()
        torch.save(self.state(), buf)
        return atomic_write_bytes(self.out / "checkpoints" / "last.pt", buf.getvalue())

    def load_checkpoint(self, path: Path) -> None:
        if not path.is_file():
            raise CheckpointError(f"no checkpoint to resume from at {path}; run without --resume")
        try:
            st = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as exc:  # torch raises many types for a damaged file
            raise CheckpointError(
                f"checkpoint {path} is unreadable ({type(exc).__name__}); delete it"
            ) from None
        old, new = _flat(st["config"]), _flat(self.cfg)
        changed = sorted(
            k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in _RESUMABLE_CHANGES
        )
        if changed:
            raise ConfigError(
                f"config differs from the checkpoint's in {', '.join(changed[:3])}; resume with the same config"
            )
        self.model.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.scaler.load_state_dict(st["scaler"])
        random.setstate(st["rng"]["python"])
        np.random.set_state(st["rng"]["numpy"])
        torch.set_rng_state(st["rng"]["torch"].cpu())
        if st["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in st["rng"]["cuda"]])
        self.step = int(st["step"])

    # --- the run -------------------------------------------------------------------------------------

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Train to `optim.steps`; returns {"model": export path, "val": last validation, "steps": n}."""
        from tqdm import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out / "metrics.jsonl"
        if resume:
            self.load_checkpoint(self.out / "checkpoints" / "last.pt")
            _truncate_metrics(metrics_path, self.step)
        else:
            metrics_path.write_text("")
            (self.out / "config.json").write_text(json.dumps(self.cfg, indent=2))
        if self.cfg["data"]["precache"]:
            # Each cache entry is written whole or not at all (temp file + rename), so a stop here keeps
            # what was encoded and the same command continues from there.
            with _StopOnSignals(at_once=True) as stop:
                try:
                    self.precache()
                except KeyboardInterrupt:
                    raise TrainingInterrupted(
                        f"{_stopped_by(stop.signum)} while caching embeddings; the cached ones are kept: "
                        "run the same command again to continue",
                        stop.signum,
                    ) from None
        every = {k: int(self.cfg[k]) for k in ("log_every", "checkpoint_every", "val_every")}
        val: dict[str, float] = {}
        if not resume and self.val_source is not None and every["val_every"] > 0:
            val = self._log_val(metrics_path)
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
        batches = step_batches(self.drawer, self.step, self.steps, int(self.cfg["data"]["workers"]))
        with _StopOnSignals() as stop:
            for drawn in batches:
                if stop.requested:
                    break
                window.append(self.train_step(drawn))
                bar.update(1)
                bar.set_postfix(loss=f"{window[-1]['loss']:.4f}")
                if self.step % every["log_every"] == 0 or self.step == self.steps or stop.requested:
                    row = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                    row["sec_per_step"] = (time.perf_counter() - t0) / len(window)
                    if self.device.type == "cuda":
                        row["cuda_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                    _append(metrics_path, {"step": self.step, **row})
                    window, t0 = [], time.perf_counter()
                if every["checkpoint_every"] > 0 and self.step % every["checkpoint_every"] == 0:
                    self.save_checkpoint()
                if (
                    every["val_every"] > 0
                    and self.step % every["val_every"] == 0
                    and self.step < self.steps
                    and not stop.requested
                ):
                    val = self._log_val(metrics_path)
            batches.close()  # stops the worker processes
        bar.close()
        if stop.requested and self.step < self.steps:
            path = self.save_checkpoint()
            raise TrainingInterrupted(
                f"{_stopped_by(stop.signum)} at step {self.step}; saved {path}; continue with --resume",
                stop.signum,
            )
        self.save_checkpoint()
        if self.val_source is not None:
            val = self._log_val(metrics_path)
        plot_curves(metrics_path, self.out / "curves.png")
        return {"model": self.export(), "val": val, "steps": self.step, "out": self.out}

    def _log_val(self, metrics_path: Path) -> dict[str, float]:
        val = self.validate()
        _append(metrics_path, {"step": self.step, "val": val})
        return val

    def export(self) -> Path:
        """Write out/model.safetensors (samkit.load opens it); LoRA is merged into the encoder first."""
        import samkit

        model = self.model
        if self.mode == "lora":
            import copy

            model = copy.deepcopy(model)
            merge_lora(model.image_encoder)
        model = model.eval()
        name = self.cfg["export"]["name"] or f"{self.model.arch or 'custom'}-{self.mode}"
        path = samkit.save(model, self.out / "model.safetensors", name=name)
        if self.cfg["export"]["official_pth"]:
            buf = io.BytesIO()
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
            atomic_write_bytes(self.out / "model.pth", buf.getvalue())
        return path


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by SIGINT (Ctrl-C) or SIGTERM (`kill`, docker stop, a scheduler's preemption); the
    message says what was kept. `exit_code` is what `samkit train` exits with: 128 + the signal's number,
    as a shell reports a process ended by it (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum or signal.SIGINT)


def _stopped_by(signum: int) -> str:
    return "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"


class _StopOnSignals:
    """While active, the first SIGINT (Ctrl-C) or SIGTERM only records its number in `signum` and sets
    `requested`, so the loop can finish its step and save; a second one raises TrainingInterrupted at once.
    With `at_once`, the first one raises already (for work that keeps nothing half done).

    Outside the main thread it installs nothing. A signal sent to the whole process group (a terminal's
    Ctrl-C, SLURM's SIGTERM) also reaches the DataLoader workers: they must ignore it (train/data.py's
    `_worker_init`), or torch ends them and the step in progress fails."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, at_once: bool = False) -> None:
        self.at_once = at_once
        self.signum = 0
        self.previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def __enter__(self) -> _StopOnSignals:
        self.signum = 0
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise TrainingInterrupted(
                f"{_stopped_by(signum)} again: stopped at once, without saving the step in progress", signum
            )
        self.signum = signum
        if self.at_once:
            raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            if handler is not None:
                signal.signal(s, handler)
        self.previous = {}


def _layer_scales(encoder: nn.Module, decay: float) -> dict[str, float]:
    """lr scale per encoder parameter: decay ** (blocks above it). Blocks are numbered in registration order;
    parameters outside blocks take the last block seen (so the stem gets the smallest lr, the neck 1)."""
    ids: dict[str, int] = {}
    seen: dict[str, int] = {}
    for name, _ in encoder.named_parameters():
        m = re.match(r"^(.*?blocks\.\d+)\.", name)
        if m:
            seen.setdefault(m.group(1), len(seen) + 1)
            ids[name] = seen[m.group(1)]
        else:
            ids[name] = len(seen)
    top = max(len(seen), 1)
    return {name: decay ** (top - i) for name, i in ids.items()}


def _freeze_batchnorm(model: nn.Module) -> None:
    """Keep BatchNorm (TinyViT) in eval mode: batch statistics of 1-2 images would ruin its running stats."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _append(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows written after the checkpoint we resume from (they will be produced again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def read_metrics(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """metrics.jsonl -> (training rows, validation rows)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
    return [r for r in rows if "val" not in r], [r for r in rows if "val" in r]


def plot_curves(metrics: Path, out: Path) -> Path | None:
    """Loss and IoU against step (training and validation) as a PNG; None if there is nothing to plot."""
    train, val = read_metrics(metrics)
    if not train:
        return None
    try:
        require("eval", "the training plot")
    except MissingExtraError as exc:
        print(f"samkit: {out.name} not written: {exc}", file=sys.stderr)
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [r["step"] for r in train]
    key = "loss"
    ax1.plot(steps, [r[key] for r in train], label="train loss")
    ax1.set_xlabel("step")
    ax1.set_yscale("log")
    ax1.legend()
    for k, label in (("iou_first", "train IoU, first prompt"), ("iou_last", "train IoU, last round")):
        if k in train[0]:
            ax2.plot(steps, [r[k] for r in train], label=label)
    if val and val[0]["val"]:
        ax2.plot(
            [r["step"] for r in val], [r["val"]["mIoU_top"] for r in val], "o-", label="val 1-point mIoU"
        )
    ax2.set_xlabel("step")
    ax2.set_ylim(0, 1)
    if ax2.lines:
        ax2.legend()
    else:  # distillation logs no IoU
        ax2.set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(out, buf.getvalue())


def train(
    config: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    resume: bool = False,
    progress: bool = True,
    **values: Any,
) -> dict[str, Any]:
    """Train from a YAML config (or a config dict) with `key=value` overrides; see `Trainer.run`."""
    cfg = load_config(config, overrides, **values)
    return Trainer(cfg, progress=progress).run(resume=resume)
