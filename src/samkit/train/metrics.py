"""The run's log: metrics.jsonl (one JSON row per logged step or validation) and its plot, curves.png."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

from samkit.errors import MissingExtraError
from samkit.extras import require
from samkit.formats import atomic_write_bytes


def append_row(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
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
