"""samkit-nano vs vit_t quality with the `samkit eval` protocols, on the same objects of each eval set.

    python benchmarks/bench_nano_quality.py [--work DIR] [--limit SET=N ...] [--clicks-limit 10]

For each set (GrabCut, Berkeley, DAVIS345, coco_mini/val): single-point (top-1, oracle) and box mIoU of
nano on the first N objects (all by default; --limit DAVIS345=60 for a quicker run), and the 20-click
protocol (NoC@85, NoC@90) of both models on the first --clicks-limit objects. vit_t's single-point and box
numbers come from its full-split per-object reports in --vit-t-reports (`samkit eval ... --out`, the ones
behind the README's "Measured quality" table), restricted to the same object ids; where a report is
missing, vit_t is run here too. Reports land in --work (a rerun skips reports already there); the table
goes to stdout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"
SETS = {
    "GrabCut": DATA / "interactive" / "GrabCut",
    "Berkeley": DATA / "interactive" / "Berkeley",
    "DAVIS345": DATA / "interactive" / "DAVIS345",
    "coco_mini/val": DATA / "instances" / "coco_mini" / "val",
}
INTERACTIVE = ("GrabCut", "Berkeley", "DAVIS345")


def _report(work: Path, name: str, protocol: str, model: str, limit: int | None, cache: Path) -> dict:
    from samkit.eval.run import run_eval

    tag = name.replace("/", "_")
    path = work / f"{model}_{tag}_{protocol}{'' if limit is None else f'_{limit}'}.json"
    if path.is_file():
        return json.loads(path.read_text())
    return run_eval(protocol, SETS[name], model, limit, path, progress=True, embedding_cache=cache)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def main() -> None:
    from samkit.hardware import run_header

    print(run_header("fp32"), flush=True)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "nano_eval"))
    ap.add_argument("--model", default="nano", help="the student (zoo name or checkpoint)")
    ap.add_argument("--limit", nargs="*", default=[], metavar="SET=N", help="first N objects of SET")
    ap.add_argument("--clicks-limit", type=int, default=10)
    ap.add_argument("--sets", nargs="*", default=list(SETS))
    ap.add_argument(
        "--vit-t-reports", default=str(ROOT / "benchmarks" / "results" / "nano_eval" / "vit_t_full")
    )
    ap.add_argument("--embedding-cache", default=None, help="default WORK/embeddings")
    args = ap.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(args.embedding_cache) if args.embedding_cache else work / "embeddings"
    limits = {k: int(v) for k, v in (s.split("=") for s in args.limit)}
    ref_dir = Path(args.vit_t_reports)
    rows = []
    for name in args.sets:
        limit = limits.get(name)
        row: dict = {"set": name}
        for protocol in ("single-point", "box"):
            ours = _report(work, name, protocol, args.model, limit, cache)
            ref_path = ref_dir / f"vit_t_{name.replace('/', '_')}_{protocol}.json"
            if ref_path.is_file():
                ref_items = {it["id"]: it for it in json.loads(ref_path.read_text())["items"]}
                ref = [ref_items[it["id"]] for it in ours["items"]]
            else:
                ref = _report(work, name, protocol, "vit_t", limit, cache)["items"]
            row["objects"] = len(ours["items"])
            keys = ("iou_top", "iou_oracle") if protocol == "single-point" else ("iou",)
            for k in keys:
                row[f"{k}_nano"] = _mean([it[k] for it in ours["items"]])
                row[f"{k}_vit_t"] = _mean([it[k] for it in ref])
        if name in INTERACTIVE and args.clicks_limit > 0:
            for model, label in ((args.model, "nano"), ("vit_t", "vit_t")):
                s = _report(work, name, "clicks", model, args.clicks_limit, cache)["summary"]
                row[f"noc85_{label}"], row[f"noc90_{label}"] = s["NoC@85"], s["NoC@90"]
                row["click_objects"] = s["n_items"]
        rows.append(row)

    print(f"{args.model} vs vit_t, samkit eval protocols, same objects (ratio = nano / vit_t)")
    print(
        f"{'set':14s} {'objects':>7s} {'1pt top vit_t':>13s} {'nano':>6s} {'ratio':>6s} {'oracle vit_t':>12s}"
        f" {'nano':>6s} {'box vit_t':>9s} {'nano':>6s} {'clicks on':>9s} {'NoC85 vit_t':>11s} {'nano':>5s}"
        f" {'NoC90 vit_t':>11s} {'nano':>5s}"
    )
    for r in rows:
        noc = (
            f" {r['click_objects']:9d} {r['noc85_vit_t']:11.2f} {r['noc85_nano']:5.2f}"
            f" {r['noc90_vit_t']:11.2f} {r['noc90_nano']:5.2f}"
            if "noc85_nano" in r
            else ""
        )
        print(
            f"{r['set']:14s} {r['objects']:7d} {r['iou_top_vit_t']:13.3f} {r['iou_top_nano']:6.3f}"
            f" {r['iou_top_nano'] / r['iou_top_vit_t']:6.3f} {r['iou_oracle_vit_t']:12.3f}"
            f" {r['iou_oracle_nano']:6.3f} {r['iou_vit_t']:9.3f} {r['iou_nano']:6.3f}{noc}"
        )
    print("aim (issue 13): nano single-point top-1 >= 0.9 x vit_t on every set")


if __name__ == "__main__":
    main()
