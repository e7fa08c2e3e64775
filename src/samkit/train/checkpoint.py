"""Resumable state: checkpoints/last.pt (model, optimiser, scheduler, scaler, RNG states, step, config)."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samkit.errors import CheckpointError
from samkit.formats import atomic_write_bytes
from samkit.train.config import ConfigError

# Keys that may change between a run and its resume without changing the result up to the old end.
RESUMABLE_CHANGES = {
    "optim.steps",
    "optim.epochs",
    "log_every",
    "checkpoint_every",
    "val_every",
    "out",
    "data.workers",
}


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write `state` to `path` atomically (temp file + rename)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return atomic_write_bytes(path, buf.getvalue())


def read_checkpoint(path: Path, device: torch.device, config: dict[str, Any]) -> dict[str, Any]:
    """The state saved at `path`, if it was saved with `config` (but for RESUMABLE_CHANGES)."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume from at {path}; run without --resume")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}); delete it") from None
    old, new = _flat(state["config"]), _flat(config)
    changed = sorted(
        k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES
    )
    if changed:
        raise ConfigError(
            f"config differs from the checkpoint's in {', '.join(changed[:3])}; resume with the same config"
        )
    return state


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out
