"""Training the learned-prompt head: the grid segment-everything run is the teacher.

Two steps, each a function and a `python -m samkit.train.prompt_head` subcommand:

* `teacher`: for each training image, the image embedding (1, 256, 64, 64) and the prompt points
  (x, y original-image pixels) of the masks that the 32 x 32 grid run keeps, one `.npz` per image
  (rerun skips done images).
* `fit`: a `PromptHead` trained on those files to put a peak on each kept mask's prompt point (a
  Gaussian heat map on the 64 x 64 embedding grid, focal loss); saved as safetensors.

`samkit train configs/prompt_head.yaml` (a config with `task: prompt_head`) runs both (`train_from_config`)
and writes the head, a JSON log and a model card.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samkit.everything.learned import PEAK_DEFAULTS, pick_points, points_to_cells
from samkit.models.prompt_head import PromptHead

SIGMA_CELLS = 1.0  # Gaussian radius of a target peak, in embedding cells (16 input pixels each)


def make_teacher(
    images: list[Path],
    out_dir: Path,
    model_name: str = "vit_t",
    time_budget_s: float = 1e9,
    settings: dict[str, Any] | None = None,
) -> None:
    """One `<set>_<stem>.npz` per image in `out_dir`: features float16 (256, 64, 64), points float32 (N, 2)
    (x, y original pixels of the kept masks' prompts), original_size, input_size, grid_seconds.
    `settings`: MaskGenerator keyword arguments of the grid teacher (default: its defaults)."""
    import samkit
    from samkit.everything.generator import MaskGenerator
    from samkit.image import load_image
    from samkit.predictor import Predictor

    out_dir.mkdir(parents=True, exist_ok=True)
    model = samkit.load(model_name, dtype="fp32")
    generator = MaskGenerator(model, output_mode="coco_rle", **(settings or {}))
    pred = Predictor(model)
    start = time.perf_counter()
    for path in images:
        dest = out_dir / f"{_set_name(path)}_{path.stem}.npz"
        if dest.exists():
            continue
        if time.perf_counter() - start > time_budget_s:
            break
        arr = load_image(path)
        t0 = time.perf_counter()
        pred.set_image(arr)
        records = generator.generate(arr, embedded=pred)
        seconds = time.perf_counter() - t0
        points = np.array([r["point_coords"][0] for r in records], dtype=np.float32).reshape(-1, 2)
        tmp = dest.with_suffix(".tmp.npz")
        np.savez_compressed(
            tmp,
            features=pred.embedding[0].cpu().numpy().astype(np.float16),
            points=points,
            original_size=np.array(pred.original_size),
            input_size=np.array(pred.input_size),
            grid_seconds=np.array(seconds),
        )
        os.replace(tmp, dest)
        print(f"{dest.name}: {len(points)} masks, {seconds:.1f} s", flush=True)


def heatmap_target(
    points: np.ndarray,
    original_size: tuple[int, int],
    input_size: tuple[int, int],
    side: int = 64,
    sigma: float = SIGMA_CELLS,
) -> torch.Tensor:
    """(side, side) float32 target: max over the points of a Gaussian centred on each point's cell
    position (x, y original pixels -> embedding cells); 1.0 at each point's own cell."""
    cells = points_to_cells(points, original_size, input_size)
    centres = torch.arange(side, dtype=torch.float32) + 0.5
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    target = torch.zeros(side, side)
    for cx, cy in cells:
        g = torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2))
        target = torch.maximum(target, g)
        target[int(cy), int(cx)] = 1.0
    return target


def _valid_area(input_size: tuple[int, int], side: int = 64) -> torch.Tensor:
    """(side, side) bool: embedding cells that cover image pixels (not padding)."""
    h, w = (-(-s // 16) for s in input_size)
    valid = torch.zeros(side, side, dtype=torch.bool)
    valid[:h, :w] = True
    return valid


def focal_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss on (B, H, W) logits and Gaussian targets, over valid cells,
    normalised by the number of peaks (cells where target == 1)."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = (target >= 1.0) & valid
    neg = (~pos) & valid
    pos_loss = -((1 - p) ** 2 * torch.log(p))[pos].sum()
    neg_loss = -(((1 - target) ** 4) * p**2 * torch.log(1 - p))[neg].sum()
    return (pos_loss + neg_loss) / pos.sum().clamp(min=1)


def _load(files: list[Path]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features (N, 256, 64, 64), heat-map targets (N, 64, 64) and valid cells (N, 64, 64) of the files."""
    feats, targets, valids = [], [], []
    for f in files:
        d = np.load(f)
        osz = tuple(int(v) for v in d["original_size"])
        isz = tuple(int(v) for v in d["input_size"])
        feats.append(torch.from_numpy(d["features"].astype(np.float32)))
        side = feats[-1].shape[-1]  # 64 for a 1024 px encoder
        targets.append(heatmap_target(d["points"], osz, isz, side))
        valids.append(_valid_area(isz, side))
    return torch.stack(feats), torch.stack(targets), torch.stack(valids)


@torch.no_grad()
def heldout_report(
    head: PromptHead, files: list[Path], thresholds: tuple[float, ...] = (0.1, 0.2, 0.25, 0.3)
) -> list:
    """Per threshold (the other PEAK_DEFAULTS kept): mean prompts per image, and the share of the teacher's
    kept prompts that are picked themselves or have a picked prompt within one step of the 32 x 32 grid
    (Chebyshev), over held-out teacher files (training images the head did not see)."""
    rows = []
    for t in thresholds:
        settings = dataclasses.replace(PEAK_DEFAULTS, threshold=t)
        n_points, exact, near, total = [], 0, 0, 0
        for f in files:
            d = np.load(f)
            osz = tuple(int(v) for v in d["original_size"])
            isz = tuple(int(v) for v in d["input_size"])
            logits = head(torch.from_numpy(d["features"].astype(np.float32))[None])[0, 0]
            picked = pick_points(logits, osz, isz, settings)
            n_points.append(len(picked))
            if len(d["points"]) and len(picked):
                step = np.array([osz[1], osz[0]]) / 32
                dist = (np.abs(d["points"][:, None, :] - picked[None]) / step).max(-1).min(1)
                exact += int((dist < 1e-3).sum())
                near += int((dist <= 1 + 1e-3).sum())
            total += len(d["points"])
        rows.append(
            {
                "threshold": t,
                "prompts_per_image": float(np.mean(n_points)),
                "teacher_prompts_picked": exact / max(total, 1),
                "teacher_prompts_within_1_step": near / max(total, 1),
            }
        )
    return rows


def fit(
    teacher_dir: Path,
    out: Path,
    steps: int = 400,
    lr: float = 2e-3,
    batch: int = 8,
    seed: int = 0,
    holdout: int = 6,
) -> dict:
    """Train a PromptHead on the teacher files but the last `holdout` made (reported on, not trained on);
    writes `out` (safetensors) and `<out>.json` (settings, loss log, held-out report)."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    all_files = sorted(teacher_dir.glob("*.npz"), key=lambda f: f.stat().st_mtime)
    if len(all_files) <= holdout:
        raise FileNotFoundError(f"need more than {holdout} teacher files in {teacher_dir}")
    files, held = all_files[: len(all_files) - holdout], all_files[len(all_files) - holdout :]
    x_all, t_all, v_all = _load(files)
    head = PromptHead()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    log = []
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(files), (batch,))
        x, t, v = x_all[idx], t_all[idx], v_all[idx]
        loss = focal_loss(head(x)[:, 0], t, v)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log.append({"step": step, "loss": loss.item(), "seconds": time.perf_counter() - t0})
            print(log[-1], flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out))
    head.eval()
    report = heldout_report(head, held) if held else []
    for row in report:
        print(row, flush=True)
    info = {
        "images": len(files),
        "heldout_images": [f.stem for f in held],
        "heldout": report,
        "steps": steps,
        "lr": lr,
        "batch": batch,
        "seed": seed,
        "sigma_cells": SIGMA_CELLS,
        "seconds": time.perf_counter() - t0,
        "log": log,
    }
    out.with_suffix(".json").write_text(json.dumps(info, indent=1))
    return info


# Where a teacher image comes from -> the licence of its data, for the model card (see the datasets' README).
_LICENCES = {
    "coco_mini": "COCO 2017: annotations CC BY 4.0, images per their Flickr licence",
    "ccp": "Clothing Co-Parsing: Apache-2.0",
    "camvid": "CamVid: research use, non-commercial",
    "dsb2018": "DSB 2018 (BBBC038): CC0",
    "bsds500": "BSDS500: research use",
}


def _set_name(image: Path) -> str:
    """The dataset an image belongs to: `<set>/<split>/images/x.jpg` (instances) and
    `bsds500/images/<split>/x.jpg` both name their set three folders up."""
    return image.parent.parent.parent.name


def _check_training_folder(folder: Path) -> None:
    """A ConfigError for an evaluation split (never a teacher: the head is measured on those)."""
    from samkit.train.config import ConfigError

    parts = folder.resolve().parts
    if (
        "interactive" in parts
        or ("instances" in parts and "val" in parts)
        or ("bsds500" in parts and "test" in parts)
    ):
        raise ConfigError(f"{folder} is an evaluation split; the prompt head trains on training splits only")
    if not folder.is_dir():
        raise ConfigError(f"teacher image folder not found: {folder}")


def training_images(folders: list[str | Path], per_folder: int | None = None) -> list[Path]:
    """The images of `folders` (training splits; evaluation splits are refused), the first `per_folder`
    of each in name order, interleaved so that a time budget covers every folder. BSDS500 images listed
    in its `eval-overlap.txt` (they are also in Berkeley and GrabCut) are skipped."""
    per = []
    for f in map(Path, folders):
        _check_training_folder(f)
        files = sorted(p for p in f.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        overlap = f.parent.parent / "eval-overlap.txt"
        if f.parent.parent.name == "bsds500" and overlap.is_file():
            skip = set(overlap.read_text().split())
            files = [p for p in files if p.stem not in skip]
        per.append(files[:per_folder] if per_folder is not None else files)
    n = max((len(p) for p in per), default=0)
    return [p[i] for i in range(n) for p in per if i < len(p)]


def _model_card(cfg: dict[str, Any], info: dict[str, Any], teacher_dir: Path, head_file: Path) -> str:
    sets: dict[str, int] = {}
    masks, seconds = 0, []
    for f in sorted(teacher_dir.glob("*.npz")):
        d = np.load(f)
        name = next((s for s in _LICENCES if f.stem.startswith(s + "_")), f.stem.rsplit("_", 1)[0])
        sets[name] = sets.get(name, 0) + 1
        masks += len(d["points"])
        seconds.append(float(d["grid_seconds"]))
    rows = [
        ("head file", f"{head_file.name}, {head_file.stat().st_size / 2**20:.2f} MB"),
        ("encoder", f"the image embedding of `{cfg['model']}`"),
        ("teacher", f"grid segment everything, settings {cfg['teacher'].get('settings') or 'default'}"),
        (
            "data",
            f"{info['images']} training-split images trained on and {len(info['heldout_images'])} held out "
            f"(the last made), of {', '.join(f'{n} {s}' for s, n in sets.items())}; {masks} kept teacher masks",
        ),
        ("data licences", "; ".join(_LICENCES.get(s, f"{s}: see the dataset's terms") for s in sets)),
        ("teacher time", f"{np.mean(seconds):.1f} s per image (grid run, this machine)" if seconds else "-"),
        (
            "training",
            f"{info['steps']} steps, batch {info['batch']}, AdamW lr {info['lr']} (cosine), seed {info['seed']}, "
            f"{info['seconds']:.0f} s",
        ),
    ]
    for row in info["heldout"]:
        rows.append(
            (
                f"held out, threshold {row['threshold']}",
                f"{row['prompts_per_image']:.0f} prompts per image; of the teacher's kept prompts "
                f"{100 * row['teacher_prompts_picked']:.0f}% picked, "
                f"{100 * row['teacher_prompts_within_1_step']:.0f}% within one grid step of a pick",
            )
        )
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (
        f"# Model card: {head_file.name}\n\n"
        'A `PromptHead` for `MaskGenerator(prompts="learned")`, trained by `samkit train` from a '
        "`task: prompt_head` config. The held-out figures are on training-split images the head did not see; "
        "no evaluation split was used for training or for choosing settings.\n\n"
        f"| | |\n|---|---|\n{table}\n"
    )


def load_prompt_head_config(
    config: str | Path, overrides: list[str] | tuple[str, ...] = (), out: str | Path | None = None
) -> dict[str, Any]:
    """The settings of a `task: prompt_head` YAML config (defaults <- file <- `a.b=value` overrides <- `out`),
    checked: unknown keys and a config without teacher folders are one-line ConfigErrors."""
    from samkit.train.config import ConfigError, parse_override, read_yaml, task_of

    cfg: dict[str, Any] = {
        "model": "vit_t",
        "out": "runs/prompt_head",
        "threads": None,
        "teacher": {"folders": [], "per_folder": None, "budget_s": None, "dir": None, "settings": {}},
        "fit": {"steps": 400, "lr": 2e-3, "batch": 8, "seed": 0, "holdout": 6},
    }
    user = read_yaml(config)
    if task_of(user) != "prompt_head":
        raise ConfigError(f"{config} is not a `task: prompt_head` config")
    user.pop("task")
    for key, value in user.items():
        if key not in cfg:
            raise ConfigError(f"unknown config key {key!r}; known keys: task, {', '.join(cfg)}")
        if isinstance(cfg[key], dict):
            unknown = set(value or {}) - set(cfg[key])
            if unknown:
                raise ConfigError(
                    f"unknown config key {key}.{sorted(unknown)[0]}; known: {', '.join(cfg[key])}"
                )
            cfg[key].update(value or {})
        else:
            cfg[key] = value
    for text in overrides:
        keys, value = parse_override(text)
        node = cfg
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                raise ConfigError(f"--set {text}: {k!r} is not a config section")
            node = node[k]
        if keys[-1] not in node:
            raise ConfigError(f"--set {text}: unknown key {keys[-1]!r}; known: {', '.join(node)}")
        node[keys[-1]] = value
    if out is not None:
        cfg["out"] = str(out)
    if not cfg["teacher"]["folders"]:
        raise ConfigError("teacher.folders: list the training-split image folders to learn from")
    return cfg


def train_from_config(
    config: str | Path, overrides: list[str] | tuple[str, ...] = (), out: str | Path | None = None
) -> dict[str, Any]:
    """Teacher (resumable: images already done are skipped) then fit, from a `task: prompt_head` YAML
    config (configs/prompt_head.yaml shows every key); `overrides` are `a.b=value` strings.

    Writes OUT/prompt_head.safetensors, OUT/prompt_head.json (the fit log) and OUT/MODEL_CARD.md;
    returns the fit's info dict with `head` and `card` (paths) added."""
    from samkit.train.config import ConfigError

    cfg = load_prompt_head_config(config, overrides, out)
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    out_dir = Path(cfg["out"])
    teacher_dir = Path(cfg["teacher"]["dir"] or out_dir / "teacher")
    t = cfg["teacher"]
    images = training_images(t["folders"], t["per_folder"])
    make_teacher(images, teacher_dir, cfg["model"], t["budget_s"] or 1e9, t["settings"])
    f = cfg["fit"]
    head_file = out_dir / "prompt_head.safetensors"
    try:
        info = fit(teacher_dir, head_file, f["steps"], f["lr"], f["batch"], f["seed"], f["holdout"])
    except FileNotFoundError as exc:
        raise ConfigError(f"{exc} (more teacher.folders images, or a larger teacher.budget_s)") from None
    card = out_dir / "MODEL_CARD.md"
    card.write_text(_model_card(cfg, info, teacher_dir, head_file))
    return {**info, "head": str(head_file), "card": str(card)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m samkit.train.prompt_head")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("teacher", help="embeddings + kept prompt points of the grid run, per training image")
    p.add_argument("folders", nargs="+", help="image folders of training splits")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--per-folder", type=int, default=None, help="first N images of each folder")
    p.add_argument("--budget-s", type=float, default=1e9, help="stop starting new images after this")
    p = sub.add_parser("fit", help="train the head on the teacher files")
    p.add_argument("teacher", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--holdout", type=int, default=6, help="last N teacher files: reported on, not trained on")
    p.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    if args.cmd == "teacher":
        make_teacher(training_images(args.folders, args.per_folder), args.out, time_budget_s=args.budget_s)
    else:
        fit(args.teacher, args.out, steps=args.steps, lr=args.lr, holdout=args.holdout)


if __name__ == "__main__":
    main()
