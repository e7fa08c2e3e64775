"""Training configuration: YAML file + `--set key=value` overrides, merged over the defaults below.

The defaults are the paper's recipe where the paper states one; the shipped configs in configs/ show
every section in use.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from samkit.errors import InputError


class ConfigError(InputError):
    """A training config that is missing, malformed, or asks for something samkit cannot do."""


MODES = ("scratch", "decoder", "frozen_encoder", "lora", "full", "distill")

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "out": "runs/train",
    "device": "auto",  # auto | cpu | cuda | cuda:N
    "amp": "auto",  # auto (bf16/fp16 on CUDA, off on CPU) | off | bf16 | fp16
    "threads": 0,  # torch CPU threads; 0 leaves torch's default
    "mode": "decoder",
    "model": {
        "init": "vit_t",  # zoo name, checkpoint path, or "scratch" (then `arch` is built untrained)
        # SamConfig fields, e.g. {encoder: vit, embed_dim: 64, depth: 2, ...}: built untrained for "scratch",
        # else warm-started from `init`'s tensors of matching names (samkit.models.nano.warm_start)
        "arch": None,
        "freeze": [],  # parameter-name prefixes kept frozen in any mode, e.g. image_encoder.backbone.layers
    },
    "teacher": None,  # distill: zoo name or checkpoint path whose image embeddings are the targets
    # distill: run the teacher on every step's (augmented) batch instead of caching its embeddings on disk
    # (a GPU can afford it; each image is then seen under fresh augmentation every time)
    "teacher_online": False,
    "lora": {"rank": 4, "alpha": 4.0, "targets": ["qkv", "proj"]},
    "data": {
        "train": [],  # list of source specs (see samkit.train.data.build_source)
        "val": None,  # one source spec, held out from training
        "masks_per_image": 8,
        "batch_size": 2,
        "augment": {"scale": [1.0, 1.0], "hflip": 0.0, "vflip": 0.0, "color": 0.0},
        "cache_variants": 1,  # augmented copies per image in the embedding cache (variant 0 is unaugmented)
        "cache_dir": None,  # default <out>/embeddings
        "precache": False,  # encode every training and validation image before step 1 (one progress bar)
        # processes drawing batches ahead of the step (0: in the training process). 0 suits CPU runs on few
        # cores; GPU configs set it. The hang once seen with 2 workers (a forked worker's cv2.setNumThreads
        # blocked on the parent's OpenCV pool lock) is fixed in train/data.py.
        "workers": 0,
    },
    "recipe": {
        "rounds": 11,
        "focal_weight": 20.0,
        "dice_weight": 1.0,
        "iou_weight": 1.0,
        "box_noise": 0.1,  # std of each box coordinate's noise, as a fraction of the box side
        "box_noise_max": 20.0,  # pixels (original-image scale is irrelevant: the input frame)
        "point_prob": 0.5,  # probability that the first prompt is a point rather than a box
        "loss_resolution": "low",  # low: logits at 256x256 vs area-downsampled GT; full: upsampled logits
    },
    "optim": {
        "steps": 1000,
        "epochs": None,  # if set, steps = ceil(epochs * training images / batch_size)
        "lr": 1e-4,
        "weight_decay": 0.1,
        "betas": [0.9, 0.999],
        "warmup": 50,
        "decay_steps": [],  # step decay: lr *= decay_factor at each of these steps
        "decay_factor": 0.1,
        "layer_decay": 0.8,  # encoder layer-wise lr decay (full / scratch fine-tuning of the encoder)
        "clip": 1.0,  # gradient-norm clipping; 0 disables
    },
    "log_every": 10,
    "checkpoint_every": 100,
    "val_every": 100,  # 0 disables periodic validation (a final one still runs if data.val is set)
    "val_objects": 50,
    "val_per_image": None,  # at most this many objects per validation image (spreads val_objects out)
    "export": {"name": None, "official_pth": False},
}


def _merge(base: dict, over: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if key not in base:
            known = ", ".join(base)
            raise ConfigError(f"unknown config key {where + key!r}; known keys here: {known}")
        if isinstance(base[key], dict) and isinstance(value, dict):
            out[key] = _merge(base[key], value, f"{where}{key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


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


def load_config(
    path: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    **values: Any,
) -> dict[str, Any]:
    """Defaults <- YAML file at `path` (or a dict) <- `overrides` ("a.b=value") <- keyword `values`."""
    import yaml

    user: dict[str, Any] = {}
    if isinstance(path, dict):
        user = path
    elif path is not None:
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
    cfg = _merge(DEFAULTS, user)
    for text in overrides:
        keys, value = parse_override(text)
        node: Any = cfg
        for k in keys[:-1]:
            node = _child(node, k, text)
        leaf = keys[-1]
        if isinstance(node, list):
            _child(node, leaf, text)
            node[int(leaf)] = value
        elif leaf in node or (isinstance(node, dict) and node is not cfg and _is_source(node)):
            node[leaf] = value
        else:
            raise ConfigError(f"--set {text}: unknown key {leaf!r}; known: {', '.join(node)}")
    cfg = _merge(cfg, values)
    validate(cfg)
    return cfg


def validate(cfg: dict[str, Any]) -> None:
    """Raise ConfigError for combinations that cannot run."""
    if cfg["mode"] not in MODES:
        raise ConfigError(f"mode {cfg['mode']!r} is not one of {', '.join(MODES)}")
    if cfg["mode"] == "distill" and not cfg["teacher"]:
        raise ConfigError("mode distill needs `teacher:` (a zoo name or checkpoint path)")
    if cfg["model"]["init"] == "scratch" and not cfg["model"]["arch"]:
        raise ConfigError("model.init scratch needs model.arch (SamConfig fields, e.g. encoder: vit)")
    if not cfg["data"]["train"]:
        raise ConfigError("data.train is empty: list at least one data source")
    specs = cfg["data"]["train"] if isinstance(cfg["data"]["train"], list) else [cfg["data"]["train"]]
    if cfg["mode"] != "distill" and any(isinstance(s, dict) and s.get("type") == "images" for s in specs):
        raise ConfigError("`type: images` sources have no masks; they can only train mode distill")
    if cfg["recipe"]["rounds"] < 1:
        raise ConfigError("recipe.rounds must be at least 1")
    if cfg["recipe"]["loss_resolution"] not in ("low", "full"):
        raise ConfigError("recipe.loss_resolution must be low or full")
    if cfg["amp"] not in ("auto", "off", "bf16", "fp16"):
        raise ConfigError(f"amp {cfg['amp']!r} is not one of auto, off, bf16, fp16")
    if int(cfg["data"]["workers"]) < 0:
        raise ConfigError("data.workers must be 0 (load in the training process) or more")
    if int(cfg["data"]["batch_size"]) < 1 or int(cfg["data"]["masks_per_image"]) < 1:
        raise ConfigError("data.batch_size and data.masks_per_image must be at least 1")
