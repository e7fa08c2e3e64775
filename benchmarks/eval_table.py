"""The README's evaluation table: every protocol on the eval splits, GrabCut baseline and vit_t.

    python benchmarks/eval_table.py [--only SUBSTRING] [--rerun] [--table-only] [--results DIR]

Each row is exactly `samkit eval PROTOCOL --data DATA --model MODEL --limit N [...]` (the command is
printed with the row) and writes its JSON report to `DIR/<model>_<set>_<protocol>.json`; a row whose
report already exists with the same settings is read back instead of run again (--rerun forces it).
Rows run one after the other in this process. To save time, the vit_t rows on one data set share each
image's embedding (computed once, reused by single-point, box and clicks): the numbers are the same as
separate `samkit eval` runs, only the wall time differs. Prints the markdown table at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"
DATA_ARG = "../shared/datasets"  # how the README's commands name DATA (run from the project root)

SETS = {
    "GrabCut": "interactive/GrabCut",
    "Berkeley": "interactive/Berkeley",
    "DAVIS345": "interactive/DAVIS345",
    "bsds500 test": "bsds500",
    "coco_mini val": "instances/coco_mini/val",
    "dsb2018 val": "instances/dsb2018/val",
}

# (model, set, protocol, limit, extra CLI options). Limits fit ~30 minutes on the 2 shared, heavily loaded
# CPU cores (vit_t: ~15-45 s per image embedding there; GrabCut: ~2-8 s a call). vit_t rows come first,
# grouped by set so that they share embeddings, then the GrabCut baseline.
ROWS: list[tuple[str, str, str, int, dict[str, Any]]] = [
    ("vit_t", "GrabCut", "single-point", 20, {}),
    ("vit_t", "GrabCut", "box", 20, {}),
    ("vit_t", "GrabCut", "clicks", 5, {}),
    ("vit_t", "Berkeley", "single-point", 10, {}),
    ("vit_t", "Berkeley", "box", 10, {}),
    ("vit_t", "Berkeley", "clicks", 5, {}),
    ("vit_t", "DAVIS345", "single-point", 10, {}),
    ("vit_t", "DAVIS345", "box", 10, {}),
    ("vit_t", "DAVIS345", "clicks", 5, {}),
    ("vit_t", "coco_mini val", "single-point", 20, {}),
    ("vit_t", "coco_mini val", "box", 20, {}),
    ("vit_t", "dsb2018 val", "single-point", 20, {}),
    ("vit_t", "dsb2018 val", "box", 20, {}),
    ("vit_t", "bsds500 test", "edges", 1, {"thresholds": 25}),
    ("vit_t", "coco_mini val", "proposals", 1, {}),
    ("grabcut", "GrabCut", "single-point", 10, {}),
    ("grabcut", "GrabCut", "box", 10, {}),
    ("grabcut", "GrabCut", "clicks", 2, {}),
    ("grabcut", "Berkeley", "single-point", 10, {}),
    ("grabcut", "Berkeley", "box", 10, {}),
    ("grabcut", "DAVIS345", "single-point", 5, {}),
    ("grabcut", "DAVIS345", "box", 5, {}),
    ("grabcut", "coco_mini val", "single-point", 10, {}),
    ("grabcut", "coco_mini val", "box", 10, {}),
    ("grabcut", "dsb2018 val", "single-point", 10, {}),
    ("grabcut", "dsb2018 val", "box", 10, {}),
    ("grabcut", "bsds500 test", "edges", 1, {"thresholds": 25, "points_per_side": 4}),
    ("grabcut", "coco_mini val", "proposals", 1, {"points_per_side": 4}),
    ("vit_t", "dsb2018 val", "proposals", 1, {}),
]


class SharedEmbeddings:
    """A samkit Predictor whose `set_image` reuses the embedding of an image it has already encoded."""

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor
        self.model = predictor.model  # lets the proposals protocol build a MaskGenerator
        self.cache: dict[str, tuple[Any, ...]] = {}

    def set_image(self, image: Any) -> None:
        key = hashlib.sha1(image.tobytes() + str(image.shape).encode()).hexdigest()
        p = self.predictor
        if key not in self.cache:
            p.set_image(image)
            self.cache[key] = (p.features, p.original_size, p.input_size)
        p.features, p.original_size, p.input_size = self.cache[key]

    def predict(self, **kwargs: Any) -> Any:
        return self.predictor.predict(**kwargs)


def command(model: str, name: str, protocol: str, limit: int, opts: dict[str, Any]) -> str:
    parts = [
        "samkit eval",
        protocol,
        "--data",
        f"{DATA_ARG}/{SETS[name]}",
        "--model",
        model,
        "--limit",
        str(limit),
    ]
    if "points_per_side" in opts:
        parts += ["--points-per-side", str(opts["points_per_side"])]
    if "thresholds" in opts:
        parts += ["--thresholds", str(opts["thresholds"])]
    return " ".join(parts)


def metrics(protocol: str, s: dict[str, Any]) -> str:
    """The row's numbers, as one short string."""
    if protocol == "single-point":
        return f"mIoU top {s['mIoU_top']:.3f} / oracle {s['mIoU_oracle']:.3f} / single {s['mIoU_single']:.3f}"
    if protocol == "box":
        return f"mIoU {s['mIoU']:.3f}"
    if protocol == "clicks":
        return (
            f"NoC@85 {s['NoC@85']:.2f}, NoC@90 {s['NoC@90']:.2f}, fail@90 {s['failures@90']}, "
            f"mIoU@1/3/5 {s['mIoU@1']:.3f} / {s['mIoU@3']:.3f} / {s['mIoU@5']:.3f}"
        )
    if protocol == "edges":
        return f"ODS {s['ODS']:.3f}, OIS {s['OIS']:.3f}, AP {s['AP']:.3f}, R50 {s['R50']:.3f}"
    return (
        f"AR@100 {s['AR@100']:.3f}, AR@1000 {s['AR@1000']:.3f} "
        f"(S/M/L@1000 {s['AR_small@1000']:.3f} / {s['AR_medium@1000']:.3f} / {s['AR_large@1000']:.3f}), "
        f"{s['n_objects']} objects"
    )


def main() -> None:
    from samkit.hardware import run_header

    print(run_header("fp32"), flush=True)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--only", default=None, help="run only rows whose '<model> <set> <protocol>' contains this"
    )
    ap.add_argument("--rerun", action="store_true", help="run rows again even if their report exists")
    ap.add_argument("--table-only", action="store_true", help="print the rows already measured; run nothing")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "eval_table"))
    args = ap.parse_args()
    torch.set_num_threads(2)

    import samkit
    from samkit.eval import run_eval
    from samkit.eval.run import _write_json

    results = Path(args.results)
    shared: dict[str, SharedEmbeddings] = {}
    table = []
    for model, name, protocol, limit, opts in ROWS:
        cmd = command(model, name, protocol, limit, opts)
        tag = f"{model} {name} {protocol}"
        suffix = f"_pps{opts['points_per_side']}" if "points_per_side" in opts else ""
        out = results / f"{model}_{name.replace(' ', '_')}_{protocol}{suffix}.json"
        if args.only and args.only not in tag:
            continue
        report = json.loads(out.read_text()) if out.is_file() and not args.rerun else None
        if report is not None and report["meta"].get("command") != cmd:
            report = None
        if report is None and args.table_only:
            continue
        if report is None:
            if model == "vit_t":
                if name not in shared:
                    shared.clear()  # one data set's embeddings at a time
                    shared[name] = SharedEmbeddings(samkit.Predictor(samkit.load("vit_t", dtype="fp32")))
                runner: Any = shared[name]
            else:
                runner = model
            t0 = time.perf_counter()
            report = run_eval(protocol, DATA / SETS[name], runner, limit=limit, **opts)
            report["meta"]["wall_s"] = round(time.perf_counter() - t0, 1)
            report["meta"]["command"] = cmd
            if model == "vit_t":
                report["meta"]["model"] = "vit_t"
                report["meta"]["checkpoint_sha256"] = samkit.registry()["vit_t"].sha256
                report["meta"]["note"] = "embeddings shared between this set's vit_t rows"
            _write_json(out, report)
        n = report["summary"]["n_items"]
        row = f"| {name} | {protocol} | {model} | {n} | {metrics(protocol, report['summary'])} | `{cmd}` |"
        table.append(row)
        print(row, flush=True)
    print()
    print("| set | protocol | model | items | result | command |")
    print("|---|---|---|---|---|---|")
    print("\n".join(table))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
