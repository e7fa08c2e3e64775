"""Model set-up per mode: the device and precision, the model a config describes, what trains."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from samkit.models.build import SamConfig, build_sam
from samkit.models.nano import warm_start
from samkit.models.sam import Sam
from samkit.train.config import ConfigError, TrainConfig
from samkit.train.lora import add_lora


@dataclass
class Precision:
    """Where and how precisely a run computes: the device, the autocast dtype (None: fp32 throughout) and
    the gradient scaler (enabled for fp16 only)."""

    device: torch.device
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler

    @classmethod
    def of(cls, device: str, amp: str) -> Precision:
        """From the config's `device` (auto | cpu | cuda | cuda:N) and `amp` (auto | off | bf16 | fp16)."""
        dev = pick_device(device)
        if amp == "off" or (amp == "auto" and dev.type != "cuda"):
            dtype = None
        elif amp == "auto":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return cls(dev, dtype, torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16))

    def autocast(self) -> AbstractContextManager[Any]:
        if self.dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.dtype)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name} asked for but CUDA is not available; use device: cpu or auto")
    return torch.device(name)


def build_model(cfg: TrainConfig, device: torch.device) -> Sam:
    """The model `cfg.model` describes, in fp32 on `device`, with LoRA adapters in mode lora."""
    import samkit

    spec = cfg.model
    if spec.arch:
        try:
            model = build_sam(SamConfig.from_dict(dict(spec.arch)))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model.arch is not a valid architecture: {exc}") from None
        model.arch = "custom"
        if spec.init != "scratch":
            # A new architecture warm-started from a checkpoint's matching tensors (samkit-nano).
            warm_start(model, samkit.load(spec.init, dtype="fp32"))
    else:
        # fp32 whatever the CPU: the config's `amp` decides the training precision.
        model = samkit.load(spec.init, dtype="fp32")
    if cfg.mode == "lora":
        lora = cfg.lora
        if add_lora(model.image_encoder, lora.rank, lora.alpha, list(lora.targets)) == 0:
            raise ConfigError(f"lora.targets {lora.targets} match no nn.Linear in the image encoder")
    return model.to(device)


def set_trainable(model: Sam, mode: str, freeze: list[str]) -> None:
    """requires_grad per mode, then off for every parameter whose name starts with a `freeze` prefix."""
    model.requires_grad_(mode in ("scratch", "full"))
    if mode in ("decoder", "frozen_encoder", "lora"):
        model.mask_decoder.requires_grad_(True)
    if mode in ("frozen_encoder", "lora"):
        model.prompt_encoder.requires_grad_(True)
    if mode == "lora":
        for name, p in model.image_encoder.named_parameters():
            p.requires_grad_("lora_" in name)
    if mode == "distill":
        model.image_encoder.requires_grad_(True)
    for name, p in model.named_parameters():
        if any(name.startswith(prefix) for prefix in freeze):
            p.requires_grad_(False)


def freeze_batchnorm(model: nn.Module) -> None:
    """Keep BatchNorm (TinyViT) in eval mode: batch statistics of 1-2 images would ruin its running stats."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
