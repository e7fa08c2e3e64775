"""Training configuration: typed sections built from a YAML file + `--set key=value` overrides.

Each section of the YAML file is one dataclass below (`model:` -> ModelConfig, `data:` -> DataConfig, ...),
and `TrainConfig` holds them with the run's top-level settings. A field's default is the paper's recipe
where the paper states one; the shipped configs in configs/ show every section in use. Unknown keys,
values of the wrong type and values out of range are each a one-line ConfigError naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from samkit.errors import InputError


class ConfigError(InputError):
    """A training config that is missing, malformed, or asks for something samkit cannot do."""


Mode = Literal["scratch", "decoder", "frozen_encoder", "lora", "full", "distill"]
MODES: tuple[str, ...] = typing.get_args(Mode)
# The top-level `task:` of a config file says which trainer reads it; "sam" (the default) is the SAM
# trainer configured by TrainConfig, "prompt_head" the learned-prompt head's.
TASKS = ("sam", "prompt_head")


@dataclass
class ModelConfig:
    """`model:` what is trained and what stays frozen."""

    init: str = "vit_t"  # zoo name, checkpoint path, or "scratch" (then `arch` is built untrained)
    # SamConfig fields, e.g. {encoder: vit, embed_dim: 64, depth: 2, ...}: built untrained for "scratch",
    # else warm-started from `init`'s tensors of matching names (samkit.models.nano.warm_start)
    arch: dict[str, Any] | None = None
    freeze: list[str] = field(default_factory=list)  # parameter-name prefixes kept frozen in any mode


@dataclass
class LoraConfig:
    """`lora:` the adapters of mode lora."""

    rank: int = 4
    alpha: float = 4.0
    targets: list[str] = field(default_factory=lambda: ["qkv", "proj"])  # nn.Linear names in the encoder


@dataclass
class AugmentConfig:
    """`data.augment:` scale jitter (resize, then crop to the model input), flips, colour."""

    scale: list[float] = field(default_factory=lambda: [1.0, 1.0])  # [low, high] factor on the longest side
    hflip: float = 0.0  # probability
    vflip: float = 0.0  # probability
    color: float = 0.0  # brightness / contrast / saturation factors drawn from 1 +- color


@dataclass
class DataConfig:
    """`data:` the training sources, the held-out one, and how batches are drawn."""

    train: list[dict[str, Any]] = field(default_factory=list)  # source specs (samkit.train.data.build_source)
    val: dict[str, Any] | None = None  # one source spec, held out from training
    masks_per_image: int = 8
    batch_size: int = 2
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    cache_variants: int = 1  # augmented copies per image in the embedding cache (variant 0 is unaugmented)
    cache_dir: str | None = None  # default <out>/embeddings
    precache: bool = False  # encode every training and validation image before step 1 (one progress bar)
    # processes drawing batches ahead of the step (0: in the training process). 0 suits CPU runs on few
    # cores; GPU configs set it. The hang once seen with 2 workers (a forked worker's cv2.setNumThreads
    # blocked on the parent's OpenCV pool lock) is fixed in train/data.py.
    workers: int = 0


@dataclass
class RecipeConfig:
    """`recipe:` the simulated interactive session and its loss."""

    rounds: int = 11
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    box_noise: float = 0.1  # std of each box coordinate's noise, as a fraction of the box side
    box_noise_max: float = 20.0  # pixels (original-image scale is irrelevant: the input frame)
    point_prob: float = 0.5  # probability that the first prompt is a point rather than a box
    loss_resolution: Literal["low", "full"] = "low"  # low: logits at 256x256 vs area-downsampled GT


@dataclass
class OptimConfig:
    """`optim:` AdamW, its schedule and gradient clipping."""

    steps: int = 1000
    epochs: float | None = None  # if set, steps = ceil(epochs * training images / batch_size)
    lr: float = 1e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup: int = 50
    decay_steps: list[int] = field(default_factory=list)  # step decay: lr *= decay_factor at each
    decay_factor: float = 0.1
    layer_decay: float = 0.8  # encoder layer-wise lr decay (full / lora fine-tuning of the encoder)
    clip: float = 1.0  # gradient-norm clipping; 0 disables


@dataclass
class ExportConfig:
    """`export:` the result file."""

    name: str | None = None  # architecture name stored in model.safetensors; default <arch>-<mode>
    official_pth: bool = False  # also write model.pth with the official key names


@dataclass
class TrainConfig:
    """A whole training run: top-level settings and one typed section per YAML section."""

    seed: int = 0
    out: str = "runs/train"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # auto: bf16/fp16 on CUDA, off on CPU
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    mode: Mode = "decoder"
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: str | None = None  # distill: zoo name or checkpoint path whose image embeddings are the targets
    # distill: run the teacher on every step's (augmented) batch instead of caching its embeddings on disk
    # (a GPU can afford it; each image is then seen under fresh augmentation every time)
    teacher_online: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log_every: int = 10
    checkpoint_every: int = 100  # 0 disables periodic checkpoints (one is still written at the end)
    val_every: int = 100  # 0 disables periodic validation (a final one still runs if data.val is set)
    val_objects: int = 50
    val_per_image: int | None = None  # at most this many objects per validation image (spreads val_objects)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict[str, Any]:
        """The nested plain-dict form (what config.json and checkpoints hold; load_config reads it back)."""
        return dataclasses.asdict(self)


# --- reading ----------------------------------------------------------------------------------------------


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file, or a one-line ConfigError."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        user = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML ({first})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys at the top level")
    return user


def task_of(config: dict[str, Any]) -> str:
    """The config's top-level `task:` (default "sam"); a ConfigError for a task samkit does not know."""
    task = config.get("task", "sam")
    if task not in TASKS:
        raise ConfigError(f"task {task!r} is not one of {', '.join(TASKS)}")
    return task


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"--set needs KEY=VALUE (dotted keys, e.g. optim.lr=1e-4), got {text!r}")
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        # YAML 1.1 reads "3e-4" (no dot) as a string; a user means the number.
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip().split("."), value


def _merge(base: dict, over: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if key not in base:
            raise ConfigError(f"unknown config key {where + key!r}; known keys here: {', '.join(base)}")
        if isinstance(base[key], dict) and isinstance(value, dict) and not _is_source(base[key]):
            out[key] = _merge(base[key], value, f"{where}{key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _is_source(node: dict) -> bool:
    """Data source specs take free-form keys (range, weight, seed, ...)."""
    return "type" in node


def _child(node: Any, key: str, text: str) -> Any:
    """node[key] for a dict section or a list item (numeric key), else a ConfigError."""
    if isinstance(node, list) and key.isdigit() and int(key) < len(node):
        return node[int(key)]
    if isinstance(node, dict) and isinstance(node.get(key), (dict, list)):
        return node[key]
    raise ConfigError(f"--set {text}: {key!r} is not a config section or list index")


def _override(cfg: dict[str, Any], text: str) -> None:
    keys, value = parse_override(text)
    node: Any = cfg
    for k in keys[:-1]:
        node = _child(node, k, text)
    leaf = keys[-1]
    if isinstance(node, list):
        _child(node, leaf, text)
        node[int(leaf)] = value
    elif leaf in node or (node is not cfg and _is_source(node)):
        node[leaf] = value
    else:
        raise ConfigError(f"--set {text}: unknown key {leaf!r}; known: {', '.join(node)}")


def load_config(
    path: str | Path | dict[str, Any] | TrainConfig | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    **values: Any,
) -> TrainConfig:
    """Defaults <- YAML file at `path` (or a dict, or a TrainConfig) <- `overrides` ("a.b=value") <- keyword
    `values` (whole sections as dicts merge key by key), checked and typed."""
    if isinstance(path, TrainConfig):
        user = path.to_dict()
    elif isinstance(path, dict):
        user = copy.deepcopy(path)
    else:
        user = read_yaml(path) if path is not None else {}
    task = task_of(user)
    if task != "sam":
        name = path if isinstance(path, (str, Path)) else "this config"
        raise ConfigError(f"{name} is a `task: {task}` config, not a SAM training config (task: sam)")
    user.pop("task", None)
    cfg = _merge(TrainConfig().to_dict(), user)
    for text in overrides:
        _override(cfg, text)
    cfg = _merge(cfg, values)
    if isinstance(cfg["data"]["train"], dict):  # one source may be given without a list
        cfg["data"]["train"] = [cfg["data"]["train"]]
    typed = _typed(TrainConfig, cfg, "")
    validate(typed)
    return typed


# --- typing -----------------------------------------------------------------------------------------------


def _typed(cls: type, node: Any, where: str) -> Any:
    """`node` (a dict) as dataclass `cls`, each value checked against its field's type."""
    if not isinstance(node, dict):
        raise ConfigError(f"{where.rstrip('.')} must be a mapping of keys, got {node!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in node:
        if key not in names:
            raise ConfigError(f"unknown config key {where + key!r}; known keys here: {', '.join(names)}")
    return cls(**{k: _value(hints[k], v, where + k) for k, v in node.items()})


def _value(tp: Any, v: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _typed(tp, v, key + ".")
    if origin in (Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _value(inner, v, key)
    if origin is Literal:
        if v not in args:
            raise ConfigError(f"{key} {v!r} is not one of {', '.join(map(str, args))}")
        return v
    if origin is list:
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {v!r}")
        return [_value(args[0], x, f"{key}.{i}") for i, x in enumerate(v)]
    if origin is dict:
        if not isinstance(v, dict):
            raise ConfigError(f"{key} must be a mapping, got {v!r}")
        return copy.deepcopy(v)
    if tp is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{key} must be true or false, got {v!r}")
        return v
    if tp is int:
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{key} must be a whole number, got {v!r}")
        return v
    if tp is float:
        if isinstance(v, str):  # "1e-4" in a YAML file (see parse_override)
            try:
                v = float(v)
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{key} must be a number, got {v!r}")
        return float(v)
    if tp is str:
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
        if not isinstance(v, str):
            raise ConfigError(f"{key} must be a string, got {v!r}")
        return v
    return v  # Any


# --- values -----------------------------------------------------------------------------------------------


def validate(cfg: TrainConfig) -> None:
    """Raise ConfigError for values out of range and combinations that cannot run."""
    if cfg.mode == "distill" and not cfg.teacher:
        raise ConfigError("mode distill needs `teacher:` (a zoo name or checkpoint path)")
    if cfg.model.init == "scratch" and not cfg.model.arch:
        raise ConfigError("model.init scratch needs model.arch (SamConfig fields, e.g. encoder: vit)")
    if not cfg.data.train:
        raise ConfigError("data.train is empty: list at least one data source")
    if cfg.mode != "distill" and any(s.get("type") == "images" for s in cfg.data.train):
        raise ConfigError("`type: images` sources have no masks; they can only train mode distill")
    at_least = {
        "recipe.rounds": (cfg.recipe.rounds, 1),
        "data.batch_size": (cfg.data.batch_size, 1),
        "data.masks_per_image": (cfg.data.masks_per_image, 1),
        "data.cache_variants": (cfg.data.cache_variants, 1),
        "data.workers": (cfg.data.workers, 0),
        "log_every": (cfg.log_every, 1),
        "checkpoint_every": (cfg.checkpoint_every, 0),
        "val_every": (cfg.val_every, 0),
        "val_objects": (cfg.val_objects, 1),
        "optim.steps": (cfg.optim.steps, 0),
        "optim.warmup": (cfg.optim.warmup, 0),
        "lora.rank": (cfg.lora.rank, 1),
        "threads": (cfg.threads, 0),
    }
    for key, (value, low) in at_least.items():
        if value < low:
            raise ConfigError(f"{key} must be at least {low}, got {value}")
    lo_hi = cfg.data.augment.scale
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
        raise ConfigError(f"data.augment.scale must be [low, high] with 0 < low <= high, got {lo_hi}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {cfg.optim.betas}")
    probabilities = {
        "data.augment.hflip": cfg.data.augment.hflip,
        "data.augment.vflip": cfg.data.augment.vflip,
        "recipe.point_prob": cfg.recipe.point_prob,
    }
    for key, p in probabilities.items():
        if not 0 <= p <= 1:
            raise ConfigError(f"{key} is a probability between 0 and 1, got {p}")
