"""Segment everything over large image sets on a Ray cluster (`pip install samkit[ray]`).

One Ray actor per worker loads the model once and runs the local engine's `process_image` on batches
of images (read/decode -> embed -> generate masks -> write the SA-1B JSON atomically), so the outputs
are the local engine's, byte for byte. The driver is the only writer of `manifest.jsonl` and of the
shards: it records each image once, whichever worker finished it.

Failure handling: when a worker process dies (killed, out of memory, node lost) the driver starts a
replacement and requeues that worker's unfinished images one per task, so a poison image is isolated;
an image whose worker died `max_attempts` times is listed as failed. A retried image whose JSON was
already written during this run (the worker died after the rename, before replying) is not redone.
Inputs and the output folder must be on a file system every node sees at the same path.

GPU actors (`gpus_per_worker` > 0, fractions share a card): Ray gives each actor its GPU ids and limits
its CUDA_VISIBLE_DEVICES to them, so an actor's own GPU is `cuda:0` inside it (`actor_device`).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samkit.engine.local import (
    ImageResult,
    Manifest,
    RunSummary,
    hold_output,
    output_paths,
    process_image,
    write_coco_for,
)
from samkit.engine.shards import Sharder
from samkit.errors import InputError, SamkitError

log = logging.getLogger(__name__)


class RayEngineError(SamkitError):
    """Ray is missing, the cluster cannot be reached, or the workers cannot start."""


def actor_device(gpu_ids: Sequence[int | str], cuda_available: bool | None = None) -> str:
    """The torch device of a Ray actor given the GPU ids Ray assigned to it (`ray.get_gpu_ids()`).

    No ids: "cpu". Ids and a usable CUDA: "cuda:0", the first of the actor's own GPUs, since Ray limits
    CUDA_VISIBLE_DEVICES to them (where that variable is left unset, the first id itself). Ids but no CUDA
    in this process (a CPU-only torch, no driver, or Ray's logical GPUs on a CPU machine): "cpu", with
    one warning line. cuda_available: None asks torch.
    """
    if not gpu_ids:
        return "cpu"
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    ids = ",".join(str(i) for i in gpu_ids)
    if not cuda_available:
        log.warning(
            "Ray assigned GPU %s to worker %d, but torch finds no CUDA device: it runs on the CPU",
            ids,
            os.getpid(),
        )
        return "cpu"
    if "CUDA_VISIBLE_DEVICES" not in os.environ:
        return f"cuda:{gpu_ids[0]}"
    return "cuda:0"


@dataclass(frozen=True)
class _Item:
    """One image of the run: its index in the input list (also its SA-1B image_id), path, JSON path
    relative to the output folder, and how many workers already died while holding it."""

    index: int
    path: str
    rel: str
    attempt: int = 0


class Worker:
    """The body of a Ray actor: one model and one MaskGenerator per process, reused for every image.

    model: zoo name or checkpoint path (None: the default model). generator_kwargs: MaskGenerator
    options (output_mode is forced to "coco_rle", as the local CLI does). threads: torch intra-op
    threads; device: "cpu", or "cuda" for a GPU actor, which then runs on its own GPU (`actor_device`).
    dtype: the encoder precision for `samkit.load`; "auto" is resolved on the worker's own machine.
    """

    def __init__(
        self,
        model: str | None,
        generator_kwargs: Mapping[str, Any],
        threads: int,
        device: str,
        dtype: str = "auto",
    ) -> None:
        import torch

        import samkit

        torch.set_num_threads(max(1, threads))
        if device != "cpu":
            import ray

            self.gpu_ids = [str(i) for i in ray.get_gpu_ids()]
            device = actor_device(self.gpu_ids)
        else:
            self.gpu_ids = []
        self.device = device
        self.generator = samkit.MaskGenerator(
            samkit.load(model, device=device, dtype=dtype, progress=False),
            **{**generator_kwargs, "output_mode": "coco_rle"},
        )

    def pid(self) -> int:
        """The worker's process id (tests kill it to simulate a lost worker)."""
        return os.getpid()

    def device_info(self) -> dict[str, Any]:
        """pid, the GPU ids Ray assigned, CUDA_VISIBLE_DEVICES as Ray set it (None: unset), and the torch
        device the model runs on."""
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return {
            "pid": os.getpid(),
            "gpu_ids": self.gpu_ids,
            "cuda_visible_devices": visible,
            "device": self.device,
        }

    def process(
        self, items: Sequence[_Item], out_dir: str, overlay: bool, run_started: float
    ) -> list[tuple[int, ImageResult, int, bool]]:
        """Segment and write each item; returns (index, result, pid, recovered) per item. A retried item
        whose JSON was written after `run_started` is reported done without redoing it (recovered)."""
        out = Path(out_dir)
        replies = []
        for item in items:
            target = out / item.rel
            if item.attempt > 0 and target.exists() and target.stat().st_mtime >= run_started:
                result = ImageResult(Path(item.path), target, "done")
                replies.append((item.index, result, os.getpid(), True))
                continue
            result = process_image(Path(item.path), self.generator, out, Path(item.rel), item.index, overlay)
            replies.append((item.index, result, os.getpid(), False))
        return replies


class RayEngine:
    """Runs segment-everything on Ray actors; `run()` may be called several times on one engine.

    model / generator_kwargs: as for `Worker`. address: None starts a local Ray (unless one is already
    initialised in this process), "auto" joins the cluster this machine belongs to, "HOST:PORT" a given
    head node. workers: actors to start (default: as many as the cluster's CPUs, or GPUs, allow).
    batch_size: images per actor call. gpus_per_worker: GPUs per actor (fractions share a GPU; > 0 runs
    the model on CUDA). cpus_per_worker: CPUs per actor, also its torch thread count. max_attempts: worker
    deaths an image may cause before it is listed as failed. dtype: as for `Worker`.
    """

    def __init__(
        self,
        model: str | None = None,
        generator_kwargs: Mapping[str, Any] | None = None,
        *,
        address: str | None = None,
        workers: int | None = None,
        batch_size: int = 4,
        gpus_per_worker: float = 0.0,
        cpus_per_worker: float = 1.0,
        max_attempts: int = 3,
        dtype: str = "auto",
    ) -> None:
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1 image, got {batch_size}")
        if workers is not None and workers < 1:
            raise InputError(f"workers must be at least 1, got {workers}")
        if gpus_per_worker < 0 or cpus_per_worker <= 0:
            raise InputError("gpus-per-worker must be >= 0 and cpus-per-worker > 0")
        self.model = model
        self.generator_kwargs = dict(generator_kwargs or {})
        self.address = address
        self.n_workers = workers
        self.batch_size = batch_size
        self.gpus_per_worker = gpus_per_worker
        self.cpus_per_worker = cpus_per_worker
        self.max_attempts = max_attempts
        self.dtype = dtype
        self.restarts = 0
        self._actors: list[Any] = []
        self._pids: list[int] = []
        self._actor_class: Any = None

    # --- cluster and actors --------------------------------------------------------------------------

    def _ray(self) -> Any:
        try:
            import ray
        except ImportError:
            raise RayEngineError("the Ray engine needs Ray: pip install 'samkit[ray]'") from None
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, include_dashboard=False, logging_level="warning")
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = self.address or "a new local instance"
                raise RayEngineError(f"cannot start or reach Ray at {where}: {exc}") from None
        return ray

    def _default_workers(self, ray: Any) -> int:
        res = ray.cluster_resources()
        by_cpu = max(1, int(res.get("CPU", 1) // self.cpus_per_worker))
        if self.gpus_per_worker > 0:
            n = int(res.get("GPU", 0) // self.gpus_per_worker)
            if n < 1:
                raise RayEngineError(
                    f"the cluster has {res.get('GPU', 0):g} GPU(s), fewer than --gpus-per-worker "
                    f"{self.gpus_per_worker:g}; lower it or add GPU nodes"
                )
            # Each actor also takes cpus_per_worker CPUs: more actors than the CPUs allow would never start.
            return min(n, by_cpu)
        return by_cpu

    def _new_actor(self, ray: Any) -> Any:
        if self._actor_class is None:
            self._actor_class = ray.remote(Worker).options(
                num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker, max_restarts=0
            )
        cls = self._actor_class
        device = "cuda" if self.gpus_per_worker > 0 else "cpu"
        return cls.remote(self.model, self.generator_kwargs, int(self.cpus_per_worker), device, self.dtype)

    def start(self, n: int | None = None) -> None:
        """Start the actors (n, or the engine's worker count) and wait until each has loaded the model;
        a model that cannot load is raised here, not as dead workers later."""
        ray = self._ray()
        want = n or self.n_workers or self._default_workers(ray)
        while len(self._actors) < want:
            self._actors.append(self._new_actor(ray))
        try:
            self._pids = ray.get([a.pid.remote() for a in self._actors])
        except ray.exceptions.RayActorError as exc:
            self.close()
            raise RayEngineError(
                f"Ray workers could not start (is the model loadable?): {_cause(exc)}"
            ) from None

    def worker_pids(self) -> list[int]:
        """Process ids of the live actors, in slot order."""
        ray = self._ray()
        self._pids = ray.get([a.pid.remote() for a in self._actors])
        return list(self._pids)

    def worker_devices(self) -> list[dict[str, Any]]:
        """`Worker.device_info` of the live actors, in slot order."""
        ray = self._ray()
        return ray.get([a.device_info.remote() for a in self._actors])

    def close(self) -> None:
        """Stop the actors (the Ray instance itself stays up)."""
        if self._actors:
            ray = self._ray()
            for a in self._actors:
                ray.kill(a)
        self._actors = []

    # --- the run -------------------------------------------------------------------------------------

    def run(
        self,
        images: Sequence[Path],
        out_dir: str | Path,
        *,
        overwrite: bool = False,
        overlay: bool = False,
        shard_size: int | None = None,
        coco: str | Path | None = None,
        progress: bool = True,
        on_result: Callable[[ImageResult], None] | None = None,
    ) -> RunSummary:
        """Segment every image of `images` whose JSON is missing (all of them with `overwrite`), writing
        the same files as `run_local`, plus tar shards of `shard_size` images with `shard_size`.

        Returns the per-image results in input order; `on_result` is called on the driver as each image
        resolves (skipped ones first). Raises OutputError when another run holds `out_dir`."""
        out = Path(out_dir).resolve()
        with hold_output(out, overwrite) as manifest:
            summary = self._run(images, out, manifest, overlay, shard_size, progress, on_result)
        if coco is not None:
            write_coco_for(Path(coco), images, [out / r for r in output_paths(images)])
        return summary

    def _run(
        self,
        images: Sequence[Path],
        out: Path,
        manifest: Manifest,
        overlay: bool,
        shard_size: int | None,
        progress: bool,
        on_result: Callable[[ImageResult], None] | None,
    ) -> RunSummary:
        rels = output_paths(images)
        sharder = Sharder(images, rels, out, shard_size) if shard_size else None
        results: dict[int, ImageResult] = {}
        todo: list[_Item] = []
        for i, (path, rel) in enumerate(zip(images, rels, strict=True)):
            skipped = manifest.skipped(path, rel)
            if skipped is not None:
                results[i] = skipped
            else:
                todo.append(_Item(i, os.path.abspath(path), str(rel)))

        bar = _Progress(len(images), len(results), progress)

        def resolve(i: int, result: ImageResult) -> None:
            results[i] = result
            bar.update(result.status)
            if on_result is not None:
                on_result(result)
            if sharder is not None:
                sharder.mark(i, result.status != "failed")

        try:
            for i in sorted(results):
                resolve(i, results[i])
            if todo:
                self._dispatch(todo, out, overlay, manifest, resolve)
        finally:
            bar.close()
        return RunSummary([results[i] for i in range(len(images))])

    def _dispatch(
        self,
        todo: list[_Item],
        out: Path,
        overlay: bool,
        manifest: Manifest,
        resolve: Callable[[int, ImageResult], None],
    ) -> None:
        ray = self._ray()
        if not self._actors:
            n = self.n_workers or self._default_workers(ray)
            self.start(min(n, (len(todo) + self.batch_size - 1) // self.batch_size))
        run_started = time.time()
        queue: deque[list[_Item]] = deque(
            todo[k : k + self.batch_size] for k in range(0, len(todo), self.batch_size)
        )
        recorded: set[int] = set()
        gen = [0] * len(self._actors)  # bumped when a slot's actor is replaced
        busy = [0] * len(self._actors)
        inflight: dict[Any, tuple[int, int, list[_Item]]] = {}

        def record(index: int, result: ImageResult, pid: int | None, recovered: bool, attempt: int) -> None:
            if index in recorded:  # a late duplicate reply: the image is already in the manifest
                return
            recorded.add(index)
            extra = {"recovered": True} if recovered else {}
            rel = result.json_path.relative_to(out)
            manifest.record(result.path, rel, result, worker=pid, attempt=attempt + 1, **extra)
            resolve(index, result)

        while queue or inflight:
            # Two calls per actor keep it busy while the driver handles the other's reply.
            for slot, actor in enumerate(self._actors):
                while queue and busy[slot] < 2:
                    batch = queue.popleft()
                    ref = actor.process.remote(batch, str(out), overlay, run_started)
                    inflight[ref] = (slot, gen[slot], batch)
                    busy[slot] += 1
            ready, _ = ray.wait(list(inflight), num_returns=1)
            slot, g, batch = inflight.pop(ready[0])
            current = g == gen[slot]  # False for a reply from an actor this slot has since replaced
            if current:
                busy[slot] -= 1
            try:
                replies = ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:
                if current:
                    # Killed too in case it is only unreachable, so that its CPUs/GPUs go to the new one.
                    ray.kill(self._actors[slot], no_restart=True)
                    self._actors[slot] = self._new_actor(ray)
                    gen[slot] += 1
                    busy[slot] = 0
                    self.restarts += 1
                for item in batch:
                    again = _Item(item.index, item.path, item.rel, item.attempt + 1)
                    if again.attempt >= self.max_attempts:
                        reason = f"worker died {again.attempt} times on it (last: {_cause(exc)})"
                        target = out / item.rel
                        record(
                            item.index,
                            ImageResult(Path(item.path), target, "failed", reason=reason),
                            None,
                            False,
                            item.attempt,
                        )
                    else:
                        queue.appendleft([again])  # alone, so that an image that kills workers is isolated
                continue
            except ray.exceptions.RayTaskError as exc:
                # process_image reports bad images itself; this is something else (e.g. out of memory).
                for item in batch:
                    failure = ImageResult(Path(item.path), out / item.rel, "failed", reason=_cause(exc))
                    record(item.index, failure, None, False, item.attempt)
                continue
            for (index, result, pid, recovered), item in zip(replies, batch, strict=True):
                record(index, result, pid, recovered, item.attempt)


def run_ray(
    images: Sequence[Path],
    out_dir: str | Path,
    model: str | None = None,
    generator_kwargs: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
    overlay: bool = False,
    shard_size: int | None = None,
    coco: str | Path | None = None,
    progress: bool = True,
    **engine_options: Any,
) -> RunSummary:
    """One run on Ray with a fresh set of actors, closed at the end.

    `engine_options`: `RayEngine`'s keyword options (address, workers, batch_size, gpus_per_worker,
    cpus_per_worker, max_attempts, dtype); the others as for `RayEngine` and `RayEngine.run`."""
    engine = RayEngine(model, generator_kwargs, **engine_options)
    try:
        return engine.run(
            images,
            out_dir,
            overwrite=overwrite,
            overlay=overlay,
            shard_size=shard_size,
            coco=coco,
            progress=progress,
        )
    finally:
        engine.close()


def _cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


class _Progress:
    """tqdm bar over all images (those already done count from the start), with done / failed counts,
    images per second and ETA over this run's work."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.counts = {"done": 0, "skipped": 0, "failed": 0}
        self.bar = None
        if enabled:
            from tqdm import tqdm

            fmt = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"
            # initial=: skipped images are not work, so they must not inflate the rate or shorten the ETA.
            self.bar = tqdm(
                total=total,
                initial=initial,
                unit="img",
                desc="everything (ray)",
                dynamic_ncols=True,
                bar_format=fmt,
            )

    def update(self, status: str) -> None:
        self.counts[status] += 1
        if self.bar is not None and status != "skipped":
            self.bar.set_postfix(
                done=self.counts["done"],
                skipped=self.counts["skipped"],
                failed=self.counts["failed"],
                refresh=False,
            )
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
