"""The embedding file: one image's encoder output plus what is needed to use it again, and who made it.

A safetensors file with one tensor, "embedding" (1, 256, g, g) float32, and string metadata:

- `original_size` "H,W" and `input_size` "h,w": the image's frame and its resized frame (prompts map
  between them);
- `arch`, `image_size`, `model_config`: the model's name, input side and architecture id (`config_id`);
- `encoder_fingerprint`: a hash of the image encoder's weights and the preprocessing (`fingerprint`). An
  embedding is only reusable by the exact encoder that made it: a fine-tune of `vit_t` shares its
  architecture, not its weights.

Loading checks the architecture id and, where both the file and the reader know one, the fingerprint; a
mismatch is a one-line `CheckpointError`. Files written before fingerprints existed carry none: they load
with the architecture check only. Needs numpy and safetensors, not torch (`fingerprint` and `config_id`
take a torch model, so torch is there when they are called).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from samkit.errors import CheckpointError

KEY = "embedding"


@dataclass(frozen=True)
class EncoderId:
    """Which encoder made an embedding. `config`: architecture id (`config_id`); `fingerprint`: the
    weights' hash (`fingerprint`), "" where unknown (files from before fingerprints, ONNX folders exported
    without one), which skips that check."""

    arch: str
    image_size: int
    config: str
    fingerprint: str = ""

    @classmethod
    def of(cls, model: Any) -> EncoderId:
        """The id of a `Sam` model (hashes its encoder on the first call per model and weights)."""
        return cls(model.arch, int(model.image_size), config_id(model), fingerprint(model))


@dataclass(frozen=True)
class EmbeddingInfo:
    """An embedding file's metadata: the frames (H, W) and (h, w), and the encoder that made it."""

    original_size: tuple[int, int]
    input_size: tuple[int, int]
    encoder: EncoderId = field(default_factory=lambda: EncoderId("", 0, ""))

    def check(self, expected: EncoderId, path: str | Path) -> None:
        """Raise CheckpointError unless `expected` may use this embedding."""
        made = self.encoder
        if made.config != expected.config:
            raise CheckpointError(
                f"embedding {path} was made by model {made.arch!r}, not {expected.arch!r}; re-embed the image"
            )
        if made.fingerprint and expected.fingerprint and made.fingerprint != expected.fingerprint:
            raise CheckpointError(
                f"embedding {path} was made by other {made.arch or 'model'} weights (encoder "
                f"{made.fingerprint}, this model's is {expected.fingerprint}); re-embed the image"
            )


def save(path: str | Path, embedding: np.ndarray, info: EmbeddingInfo) -> Path:
    """Write `embedding` (1, 256, g, g) with `info`, atomically (temp file + rename); returns the path."""
    from safetensors.numpy import save

    enc = info.encoder
    meta = {
        "original_size": f"{info.original_size[0]},{info.original_size[1]}",
        "input_size": f"{info.input_size[0]},{info.input_size[1]}",
        "arch": enc.arch,
        "image_size": str(enc.image_size),
        "model_config": enc.config,
        "encoder_fingerprint": enc.fingerprint,
    }
    data = save({KEY: np.ascontiguousarray(embedding, dtype=np.float32)}, metadata=meta)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_info(path: str | Path) -> EmbeddingInfo:
    """The metadata of an embedding file, without reading the tensor."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        encoder = EncoderId(
            meta.get("arch", ""),
            int(meta.get("image_size") or 0),
            meta.get("model_config", ""),
            meta.get("encoder_fingerprint", ""),
        )
        return EmbeddingInfo(_size(meta["original_size"]), _size(meta.get("input_size") or "0,0"), encoder)
    except Exception as exc:  # safetensors raises its own types for a missing or damaged file
        raise CheckpointError(f"cannot read embedding {path}: {exc}") from None


def load(path: str | Path, expected: EncoderId | None = None) -> tuple[np.ndarray, EmbeddingInfo]:
    """(embedding (1, 256, g, g) float32, info) of a file; with `expected`, refuse another encoder's file."""
    from safetensors import safe_open

    info = read_info(path)
    if expected is not None:
        info.check(expected, path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            embedding = f.get_tensor(KEY)
    except Exception as exc:
        raise CheckpointError(f"cannot read embedding {path}: {exc}") from None
    return embedding, info


def _size(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.split(","))
    return h, w


# --- identities of a torch model ---------------------------------------------------------------------------


def config_id(model: Any) -> str:
    """A short id of a `Sam` model's architecture (its SamConfig, else its input size)."""
    text = json.dumps(
        model.config.to_dict() if model.config is not None else model.image_size, sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_FINGERPRINTS: weakref.WeakKeyDictionary[Any, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def fingerprint(model: Any) -> str:
    """16 hex digits naming what a `Sam` model turns an image into: its input size, resize and normalisation,
    pixel mean/std, the image encoder's weights (names, dtypes and raw bytes: a bf16 copy differs from the
    fp32 one) and its reduced-precision compute (`model.encoder_amp`). Models with bit-identical encoders
    and preprocessing (`vit_t` and its decoder-only fine-tune) share it. For cache keys and embedding files.

    Cached per model object; recomputed after any in-place change of those tensors (an optimiser step,
    load_state_dict) or of `encoder_amp`.
    """
    import torch

    tensors = {f"encoder.{k}": v for k, v in model.image_encoder.state_dict().items()}
    tensors["pixel_mean"], tensors["pixel_std"] = model.pixel_mean, model.pixel_std
    settings = f"image_size={model.image_size} resize={model.resize}"
    if model.normalize != "mean_std":
        settings += f" normalize={model.normalize}"
    amp = getattr(model, "encoder_amp", None)
    state = (settings, str(amp), tuple((t.data_ptr(), _version(t)) for t in tensors.values()))
    cached = _FINGERPRINTS.get(model)
    if cached is not None and cached[0] == state:
        return cached[1]
    h = hashlib.sha1(settings.encode())
    for name, t in tensors.items():
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    if amp is not None:
        h.update(f"encoder_amp={amp}".encode())
    digest = h.hexdigest()[:16]
    _FINGERPRINTS[model] = (state, digest)
    return digest


def _version(t: Any) -> int:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors carry no version counter; they cannot change outside it
        return -1
