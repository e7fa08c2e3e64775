"""The result of a run: out/model.safetensors (and, if asked, model.pth with the official key names)."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import torch

from samkit.formats import atomic_write_bytes
from samkit.models.sam import Sam
from samkit.train.config import ExportConfig
from samkit.train.lora import merge_lora


def export_model(model: Sam, mode: str, out: Path, export: ExportConfig) -> Path:
    """Write out/model.safetensors (samkit.load opens it); LoRA is merged into a copy's encoder first."""
    import samkit

    name = export.name or f"{model.arch or 'custom'}-{mode}"
    if mode == "lora":
        model = copy.deepcopy(model)
        merge_lora(model.image_encoder)
    model = model.eval()
    path = samkit.save(model, out / "model.safetensors", name=name)
    if export.official_pth:
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
        atomic_write_bytes(out / "model.pth", buf.getvalue())
    return path
