"""Which form of a hot path runs for a tensor: the CPU-tuned one, or plain batched torch ops.

Several inference steps have a form tuned for a CPU's caches and cores: prompts decoded one at a time
(each prompt's image tokens stay in cache), the mask head upscaled a band of rows at a time, TinyViT's
MBConv blocks run a band of rows at a time, one click's masks upsampled by OpenCV on the host, candidate
mask blocks packed 8 pixels to a byte while they wait for NMS, and batches run in Python threads of one
torch thread each. On a GPU every one of those costs kernel launches or trips through the host, so there
the plain form runs: all prompts decoded in one batch, `F.interpolate` and the threshold on the device.

The choice is made from the tensor's device. `plain_ops()` makes CPU tensors take the plain form too,
so that both forms can be checked against each other on a machine without a GPU.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from samkit.errors import InputError

_force_plain = False


def resolve_device(name: str | torch.device) -> torch.device:
    """The torch device a user named ("cpu", "cuda", "cuda:1"); InputError when this machine lacks it."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {name!r}: give cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"device {name!r}: torch finds no CUDA device here (a CPU-only torch build, or no driver); "
                "use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def cpu_tuned(where: torch.Tensor | torch.device) -> bool:
    """True when the CPU-tuned form should run for a tensor (or device): it is on the CPU, and
    `plain_ops()` is not in effect."""
    device = where if isinstance(where, torch.device) else where.device
    return device.type == "cpu" and not _force_plain


@contextmanager
def plain_ops() -> Iterator[None]:
    """Run the plain (GPU) form of every hot path, also for CPU tensors, inside this block.

    Process-wide (threads started inside the block see it too); meant for tests and comparisons."""
    global _force_plain
    before = _force_plain
    _force_plain = True
    try:
        yield
    finally:
        _force_plain = before


def limit_this_thread(threads: int) -> bool:
    """Run torch's CPU ops in the calling thread on `threads` threads, leaving every other thread as it is.

    `torch.set_num_threads` also changes torch's process-wide count, which every thread that starts torch
    work later takes up (an embedding worker started meanwhile would stay on one thread), and MKL's
    process-wide count. This sets only the calling thread's OpenMP count and, where torch has MKL, its
    MKL count. False, with nothing changed, where this torch build runs on no OpenMP runtime that can be
    reached.
    """
    setters = _thread_setters()
    if not setters:
        return False
    torch.get_num_threads()  # torch sets a thread's count from its process-wide one at its first op: now
    for setter in setters:
        setter(threads)
    return True


def can_limit_threads() -> bool:
    """Whether `limit_this_thread` works with this torch build."""
    return bool(_thread_setters())


@functools.cache
def _thread_setters() -> list[Callable[[int], int]]:
    """The per-thread thread-count setters of the OpenMP runtime torch's CPU ops run on and of MKL where
    torch has it; empty where there is no OpenMP runtime to reach."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return []
    for path in sorted((Path(torch.__file__).parent / "lib").glob("libtorch_cpu.*")):
        try:
            lib = ctypes.CDLL(str(path))
            omp = lib.omp_set_num_threads
            omp.argtypes = [ctypes.c_int]
            setters = [omp]
        except (OSError, AttributeError):
            continue
        mkl = getattr(lib, "MKL_Set_Num_Threads_Local", None)  # MKL's C entry point (int by value)
        if mkl is not None:
            mkl.argtypes, mkl.restype = [ctypes.c_int], ctypes.c_int
            setters.append(mkl)
        return setters
    return []
