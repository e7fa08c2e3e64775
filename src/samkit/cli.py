"""The `samkit` command line: parses arguments and calls the public API, nothing more.

Each command is a `_cmd_<name>(args)` function registered in `_build_parser`; errors that samkit raises on
purpose are printed on one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path

from samkit.errors import SamkitError
from samkit.everything.settings import GeneratorSettings

PROMPT_HEAD_HELP = "a prompt head file trained for --model (default: the one shipped for vit_t)"
# One help line per MaskGenerator setting; the defaults come from GeneratorSettings.
GENERATOR_HELP = {
    "points_per_side": "prompt grid is N x N",
    "points_per_batch": "prompts decoded at once",
    "pred_iou_thresh": "keep masks above this predicted IoU",
    "stability_score_thresh": "keep masks at least this stable",
    "stability_score_offset": "logit shift for stability",
    "box_nms_thresh": "box IoU for removing duplicates",
    "crop_n_layers": "extra layers of image crops",
    "crop_nms_thresh": "box IoU for duplicates between crops",
    "crop_overlap_ratio": "overlap of neighbouring crops",
    "crop_n_points_downscale_factor": "fewer points per crop layer",
    "min_mask_region_area": "remove holes/islands below this area",
    "prompts": "grid: points_per_side^2 points; learned: a heat-map head's peaks (far fewer)",
    "prompt_head": f"learned: {PROMPT_HEAD_HELP}",
    "peaks": "learned: which peaks are decoded, PeakSettings fields as KEY=VALUE,... "
    "(e.g. cover_max_area=0.1,yield_after=128 for labels of parts)",
}

# A photo that ships with samkit (scikit-image's coffee.png, CC0, Rachel Michetti), so examples run anywhere.
SAMPLE_IMAGE = Path(__file__).parent / "data" / "coffee.jpg"


def _point(text: str) -> tuple[float, float, int]:
    parts = text.split(",")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"point must be X,Y or X,Y,LABEL, got {text!r}")
    try:
        x, y = float(parts[0]), float(parts[1])
        label = int(parts[2]) if len(parts) == 3 else 1
    except ValueError:
        raise argparse.ArgumentTypeError(f"point must be numbers X,Y[,LABEL], got {text!r}") from None
    return x, y, label


def _box(text: str) -> tuple[float, float, float, float]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"box must be X0,Y0,X1,Y1 numbers, got {text!r}") from None
    if len(vals) != 4:
        raise argparse.ArgumentTypeError(f"box must be X0,Y0,X1,Y1, got {text!r}")
    return vals  # type: ignore[return-value]


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="zoo name (see `samkit models`) or checkpoint path; default vit_t"
    )


def _add_access(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--token",
        default=None,
        help="require this token on every request (default: $SAMKIT_TOKEN if set); see docs/security.md",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer to this Host name (besides localhost, 127.0.0.1, [::1]); repeatable; * for any",
    )


def _add_dtype(p: argparse.ArgumentParser) -> None:
    from samkit.hardware import DTYPES

    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="image encoder precision; auto (default): bf16 where native (CUDA, CPU with AVX512_BF16/AMX), "
        "else fp32 (see `samkit info`)",
    )


def _cmd_segment(args: argparse.Namespace) -> None:
    import numpy as np

    import samkit
    from samkit.formats import atomic_write_json, save_overlay, staged_files, write_mask_pngs

    if not args.point and args.box is None:
        raise SamkitError("give at least one --point X,Y[,LABEL] or a --box X0,Y0,X1,Y1")
    image = samkit.load_image(args.image)
    pred = samkit.Predictor(samkit.load(args.model, dtype=args.dtype))
    pred.set_image(image)
    coords = np.array([p[:2] for p in args.point], dtype=float) if args.point else None
    labels = np.array([p[2] for p in args.point]) if args.point else None
    masks, scores, _ = pred.predict(coords, labels, args.box, multimask_output=not args.single)
    order = np.argsort(-scores)
    masks, scores = masks[order], scores[order]
    out = Path(args.out)
    stem = Path(args.image).stem
    boxes = [args.box] if args.box else None
    # All or nothing: a full or read-only disk must not leave masks without their scores and overlay.
    with staged_files(out) as stage:
        files = write_mask_pngs(stage, list(masks), prefix=f"{stem}_mask")
        atomic_write_json(
            stage / f"{stem}_scores.json",
            {
                "image": str(args.image),
                "model": pred.model.arch,
                "masks": [
                    {"file": Path(f).name, "predicted_iou": float(s), "area": int(m.sum())}
                    for f, s, m in zip(files, scores, masks, strict=True)
                ],
            },
        )
        save_overlay(
            stage / f"{stem}_overlay.png", image, [masks[0]], points=coords, point_labels=labels, boxes=boxes
        )
    print(
        f"{len(masks)} mask(s) -> {out}; best predicted IoU {scores[0]:.3f} "
        "(the model's own estimate of the mask's quality; it can exceed 1)"
    )


def _cmd_embed(args: argparse.Namespace) -> None:
    import samkit
    from samkit.engine.inputs import list_images

    pred = samkit.Predictor(samkit.load(args.model, dtype=args.dtype))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done = failed = 0
    for path in list_images(args.input):
        target = out / f"{path.stem}.safetensors"
        if target.exists() and not args.overwrite:
            continue
        try:
            pred.set_image(path)
        except SamkitError as exc:
            print(f"skipped: {exc}", file=sys.stderr)
            failed += 1
            continue
        pred.save_embedding(target)
        done += 1
    print(f"embedded {done} image(s) into {out}; {failed} failed")


def _cmd_sample(args: argparse.Namespace) -> None:
    print(SAMPLE_IMAGE)


def _cmd_download(args: argparse.Namespace) -> None:
    from samkit.zoo import checkpoint_path

    for name in args.names:
        print(f"{name}: {checkpoint_path(name)}")


def _cmd_models(args: argparse.Namespace) -> None:
    from samkit.hardware import cpu_line
    from samkit.zoo import describe_models

    rows = describe_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(cpu_line())
    cols = ["name", "params", "input", "file", "size_mb", "licence", "cached", "source"]
    for r in rows:
        r["name"] += " (default)" if r["default"] else ""
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))


def _cmd_info(args: argparse.Namespace) -> None:
    from samkit.hardware import describe

    info = describe()
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        print(f"{key:22} {' '.join(value) if isinstance(value, list) else value}")


def _config_from(cls: typing.Any, args: argparse.Namespace, **renamed: typing.Any) -> typing.Any:
    """A config dataclass `cls` from the options of the same names, plus `renamed` (options whose field
    is named otherwise); fields without an option keep their defaults."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**given, **renamed)


def _cmd_serve(args: argparse.Namespace) -> None:
    from samkit.extras import require

    require("app", "samkit serve")
    from samkit.serve import ServeConfig, serve

    config = _config_from(ServeConfig, args)
    serve(config, host=args.host, port=args.port, workers=args.workers, allow_hosts=args.allow_host)


def _cmd_annotate(args: argparse.Namespace) -> None:
    from samkit.extras import require

    require("app", "samkit annotate")
    from samkit.annotate import Project
    from samkit.annotate.app import serve

    db = Path(args.db) if args.db else Path(args.images) / "annotations.sqlite"
    project = Project(args.images, db, args.model, dtype=args.dtype)
    serve(project, host=args.host, port=args.port, token=args.token, allow_hosts=args.allow_host)


def _cmd_labelstudio(args: argparse.Namespace) -> None:
    from samkit.extras import require

    require("app", "samkit labelstudio")
    from samkit.labelstudio import BackendConfig, serve

    serve(_config_from(BackendConfig, args, allow_roots=args.allow_root), host=args.host, port=args.port)


def _cmd_export(args: argparse.Namespace) -> None:
    from samkit.annotate import Store, export_project

    if not Path(args.db).is_file():
        raise SamkitError(f"database not found: {args.db} (create it with `samkit annotate IMAGES --db ...`)")
    files = export_project(Store(args.db), args.out, args.format)
    print(f"{args.format}: {len(files)} file(s) -> {args.out}")


def _cmd_export_onnx(args: argparse.Namespace) -> None:
    from samkit.extras import require

    require("export", "samkit export-onnx")
    import samkit
    from samkit.export import export_onnx

    spec = export_onnx(samkit.load(args.model), args.out, quantize=args.quantize, opset=args.opset)
    kind = args.quantize or "fp32"
    print(f"{kind} encoder.onnx + decoder.onnx -> {args.out} (contract: {spec.name})")


def _cmd_import(args: argparse.Namespace) -> None:
    from samkit.annotate import Store, import_annotations
    from samkit.annotate.project import register_images

    store = Store(args.db)
    if args.images:
        register_images(store, args.images)
    elif not store.images():
        raise SamkitError(f"{args.db} has no images yet; give --images IMAGES_DIR")
    counts = import_annotations(store, args.files)
    print(
        f"imported {counts['objects']} object(s) on {counts['images']} image(s); "
        f"{counts['skipped_images']} image(s) not in the project skipped"
    )


def _cmd_eval(args: argparse.Namespace) -> None:
    from samkit.eval import format_table, run_eval

    report = run_eval(
        args.protocol,
        args.data,
        args.model,
        limit=args.limit,
        out=args.out,
        max_clicks=args.max_clicks,
        points_per_side=args.points_per_side,
        thresholds=args.thresholds,
        embedding_cache=args.embedding_cache,
        pred_iou_thresh=args.pred_iou_thresh,
        prompts=args.prompts,
        prompt_head=args.prompt_head,
        peaks=args.peaks,
    )
    print(format_table(report))
    if args.out:
        print(f"report -> {args.out}")


def _cmd_train(args: argparse.Namespace) -> None:
    from samkit.train import train
    from samkit.train.config import read_yaml, task_of

    if task_of(read_yaml(args.config)) == "prompt_head":  # resumable by itself: --resume changes nothing
        from samkit.train.prompt_head import train_from_config

        info = train_from_config(args.config, args.set, out=args.out)
        print(f"trained {info['steps']} steps -> {info['head']} (model card {info['card']})")
        return
    values = {"out": args.out} if args.out else {}
    result = train(args.config, args.set, resume=args.resume, **values)
    val = result["val"]
    score = f"; validation 1-point mIoU {val['mIoU_top']:.3f}" if val else ""
    print(f"trained {result['steps']} steps -> {result['model']}{score}")


def _cmd_everything(args: argparse.Namespace) -> None:
    import samkit
    from samkit.devices import resolve_device
    from samkit.engine.inputs import list_images
    from samkit.engine.local import run_local
    from samkit.everything.learned import parse_peaks

    images = list_images(args.input)
    options = {name: getattr(args, name) for name in GENERATOR_HELP}
    parse_peaks(options["peaks"])  # a bad --peaks stops here, before any model loads or worker starts
    if options["prompt_head"]:  # the workers (Ray's too) get it as an absolute path
        head = Path(options["prompt_head"]).resolve()
        if not head.is_file():
            raise SamkitError(f"prompt head file not found: {head}")
        options["prompt_head"] = str(head)
    if args.engine == "ray":
        from samkit.engine.ray_engine import run_ray

        if args.device != "cpu":
            raise SamkitError(
                "--device is for the local engine; Ray workers get GPUs with --gpus-per-worker G"
            )
        summary = run_ray(
            images,
            args.out,
            args.model,
            options,
            address=args.address,
            workers=args.workers,
            batch_size=args.batch_size,
            gpus_per_worker=args.gpus_per_worker,
            cpus_per_worker=args.cpus_per_worker,
            overwrite=args.overwrite,
            overlay=args.overlay,
            shard_size=args.shard_size,
            coco=args.coco,
            dtype=args.dtype,
        )
    else:
        if args.shard_size:
            raise SamkitError("--shard-size needs --engine ray")
        model = samkit.load(args.model, device=resolve_device(args.device), dtype=args.dtype)
        generator = samkit.MaskGenerator(model, output_mode="coco_rle", **options)
        summary = run_local(
            images, generator, args.out, overwrite=args.overwrite, overlay=args.overlay, coco=args.coco
        )
    print(summary.text(), file=sys.stderr if summary.failed else sys.stdout)
    if summary.results and len(summary.failed) == len(summary.results):
        raise SamkitError(f"all {len(summary.results)} image(s) failed (listed above); nothing was written")
    print(f"SA-1B JSON per image -> {args.out}" + (f"; COCO -> {args.coco}" if args.coco else ""))


EXAMPLES = {
    "segment": 'samkit segment "$(samkit sample)" --point 365,285 --out out/   (the spoon in the sample photo)\n'
    "  samkit segment photo.jpg --point 400,300 --out out/\n"
    "  samkit segment photo.jpg --point 400,300 --point 420,80,0 --box 10,10,600,400 --single --out out/",
    "embed": "samkit embed photos/ --out embeddings/",
    "everything": "samkit everything photos/ --out masks/ --overlay\n"
    "  samkit everything list.txt --out masks/ --model vit_b --points-per-side 16 --crop-n-layers 1 --coco coco.json",
    "sample": "samkit sample   (prints the path of the photo shipped with samkit)",
    "download": "samkit download vit_t",
    "models": "samkit models",
    "info": "samkit info   (CPU model and flags, the dtype `auto` picks, the ONNX int8 mode)",
    "serve": "samkit serve --model vit_t --port 8000 --workers 2   (OpenAPI docs at /docs)",
    "eval": "samkit eval clicks --data ../shared/datasets/interactive/GrabCut --model grabcut --limit 10 --out gc.json",
    "train": "samkit train configs/finetune_decoder.yaml --set optim.steps=500 --out runs/ft\n"
    "  samkit train configs/finetune_decoder.yaml --out runs/ft --resume",
    "annotate": "samkit annotate photos/ --db project.sqlite --port 8000",
    "export": "samkit export --db project.sqlite --format coco --out dataset/",
    "export-onnx": "samkit export-onnx --model vit_t --out vit_t_onnx/ [--quantize int8] [--opset 18]",
    "import": "samkit import dataset/annotations.json --db project.sqlite --images photos/",
    "labelstudio": "samkit labelstudio --model vit_t --port 9090 --label-studio-url http://localhost:8080 "
    "--api-key $LABEL_STUDIO_API_KEY [--auto]",
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samkit",
        description="Segment Anything for real users.",
        epilog="examples:\n  " + "\n  ".join(v for v in EXAMPLES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog="example:\n  " + EXAMPLES.get(name, ""),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = command(
        "segment", "segment one object from point/box prompts; writes mask PNGs, scores JSON, overlay"
    )
    p.add_argument("image")
    p.add_argument(
        "--point",
        action="append",
        type=_point,
        default=[],
        metavar="X,Y[,LABEL]",
        help="(x, y) in image pixels; LABEL 1 = foreground (default), 0 = background; repeatable",
    )
    p.add_argument("--box", type=_box, default=None, metavar="X0,Y0,X1,Y1", help="box in image pixels (XYXY)")
    p.add_argument("--single", action="store_true", help="one mask instead of 3 candidates")
    p.add_argument("--out", default="out", help="output folder (default: out)")
    _add_model(p)
    _add_dtype(p)
    p.set_defaults(func=_cmd_segment)

    p = command(
        "embed", "precompute image embeddings (safetensors, one per image) for clients and the annotator"
    )
    p.add_argument("input", help="an image, a folder (recursive) or a text file listing image paths")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    _add_model(p)
    _add_dtype(p)
    p.set_defaults(func=_cmd_embed)

    p = command(
        "everything",
        "segment everything in images: one SA-1B JSON per image, resumable (a rerun skips finished images)",
    )
    p.add_argument("input", help="an image, a folder (recursive) or a text file listing image paths")
    p.add_argument("--out", required=True, help="output folder; mirrors the input's subfolders")
    _add_model(p)
    _add_dtype(p)
    g = p.add_argument_group("generator options (as in SAM's automatic mask generator)")
    hints = typing.get_type_hints(GeneratorSettings)
    for f in dataclasses.fields(GeneratorSettings):
        default = getattr(GeneratorSettings, f.name)
        g.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(default),
            default=default,
            choices=typing.get_args(hints[f.name]) or None if isinstance(default, str) else None,
            help=GENERATOR_HELP[f.name]
            + ("" if default == "" else f" (default %(default){'s' if isinstance(default, str) else '.3g'})"),
        )
    p.add_argument("--overlay", action="store_true", help="also write <name>.overlay.jpg next to each JSON")
    p.add_argument("--overwrite", action="store_true", help="redo images that already have a JSON")
    p.add_argument("--coco", default=None, metavar="FILE.json", help="also write one COCO instances file")
    p.add_argument("--device", default="cpu", help="local engine: cpu (default), cuda or cuda:N")
    r = p.add_argument_group("engine (`--engine ray` runs on a Ray cluster: pip install 'samkit[ray]')")
    r.add_argument("--engine", choices=["local", "ray"], default="local", help="default: local")
    r.add_argument("--address", default=None, help="ray: auto | HOST:PORT (default: new local Ray)")
    r.add_argument("--workers", type=int, default=None, help="ray: actors, each with its own model")
    r.add_argument("--batch-size", type=int, default=4, help="ray: images per actor call (default 4)")
    r.add_argument("--gpus-per-worker", type=float, default=0.0, help="ray: GPUs per actor (0.5 shares one)")
    r.add_argument("--cpus-per-worker", type=float, default=1.0, help="ray: CPUs (torch threads) per actor")
    r.add_argument("--shard-size", type=int, default=None, help="ray: also pack SA-1B-style tars of K images")
    p.set_defaults(func=_cmd_everything)

    p = command("sample", "print the path of the photo that ships with samkit (CC0), to try commands on")
    p.set_defaults(func=_cmd_sample)

    p = command("download", "download model checkpoints into $SAMKIT_HOME ahead of time")
    p.add_argument("names", nargs="+")
    p.set_defaults(func=_cmd_download)

    p = command("models", "list every model: parameters, input size, file size, licence, source, cached")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_models)

    p = command("info", "this machine: CPU, flags, CUDA, what `--dtype auto` picks, ONNX int8 mode")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)

    p = command(
        "eval", "measure a model with the SAM paper's zero-shot protocols; prints a table, writes JSON"
    )
    p.add_argument("protocol", choices=["single-point", "clicks", "box", "edges", "proposals"])
    p.add_argument(
        "--data", required=True, help="RITM folder, COCO json/folder, BSDS500 root or SA-1B folder"
    )
    p.add_argument("--model", default=None, help="zoo name, checkpoint path, or `grabcut`; default vit_t")
    p.add_argument("--limit", type=int, default=None, help="only the first N items (quick runs)")
    p.add_argument("--out", default=None, help="report JSON path (clicks also writes <out>.png)")
    p.add_argument("--max-clicks", type=int, default=20, help="clicks protocol: clicks per object")
    p.add_argument("--points-per-side", type=int, default=None, help="edges/proposals: prompt grid size")
    p.add_argument(
        "--thresholds", type=int, default=99, help="edges: threshold levels (BSDS: 99; fewer is faster)"
    )
    p.add_argument(
        "--embedding-cache",
        default=None,
        metavar="DIR",
        help="keep image embeddings here, per encoder weights: reruns and models sharing an encoder reuse them",
    )
    p.add_argument(
        "--pred-iou-thresh",
        type=float,
        default=None,
        help="proposals: MaskGenerator's predicted-IoU filter (default 0.88; 0 for a re-trained IoU head)",
    )
    p.add_argument(
        "--prompts",
        choices=["grid", "learned"],
        default="grid",
        help="proposals: MaskGenerator's prompts, the point grid or the learned heat-map peaks (default grid)",
    )
    p.add_argument(
        "--prompt-head",
        default=None,
        metavar="FILE",
        help=f"proposals, learned: {PROMPT_HEAD_HELP}",
    )
    p.add_argument(
        "--peaks", default="", metavar="KEY=VALUE,...", help=f"proposals, {GENERATOR_HELP['peaks']}"
    )
    p.set_defaults(func=_cmd_eval)

    p = command("train", "train, fine-tune or distill a model from a YAML config (see configs/)")
    p.add_argument("config", help="YAML config file (see configs/ and the README)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, dotted keys (e.g. optim.lr=1e-4); repeatable",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    p.add_argument("--out", default=None, help="output folder (default: the config's `out`)")
    p.set_defaults(func=_cmd_train)

    p = command("serve", "HTTP service: POST /embed, /predict, /everything; GET /models, /health, /docs")
    _add_model(p)
    _add_dtype(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="processes, each with its own model (default 1)")
    p.add_argument("--cache-dir", default=None, help="embedding cache (default $SAMKIT_HOME/serve/MODEL)")
    p.add_argument("--max-embeddings", type=int, default=256, help="LRU bound of the embedding cache")
    p.add_argument("--max-upload-mb", type=float, default=32.0, help="larger requests get 413")
    p.add_argument(
        "--prompt-head",
        default=None,
        metavar="FILE",
        help=f"/everything?prompts=learned: {PROMPT_HEAD_HELP}",
    )
    _add_access(p)
    p.set_defaults(func=_cmd_serve)

    p = command("annotate", "annotate a folder of images in the browser, with the model proposing masks")
    p.add_argument("images", help="folder of images (recursive)")
    p.add_argument("--db", default=None, help="project database (default: IMAGES/annotations.sqlite)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    _add_model(p)
    _add_dtype(p)
    _add_access(p)
    p.set_defaults(func=_cmd_annotate)

    p = command("export", "write an annotation project as SA-1B (one JSON per image) or COCO instances")
    p.add_argument("--db", required=True, help="project database written by `samkit annotate`")
    p.add_argument("--format", choices=["sa1b", "coco"], default="coco")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_cmd_export)

    p = command(
        "export-onnx",
        "write a model as ONNX encoder + decoder, for onnxruntime (`samkit.OnnxPredictor`) and browsers "
        "(pip install 'samkit[export]')",
    )
    _add_model(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quantize", choices=["int8"], default=None, help="int8 dynamic quantization")
    p.add_argument("--opset", type=int, default=18, help="opset version 18..20 (default 18)")
    p.set_defaults(func=_cmd_export_onnx)

    p = command(
        "labelstudio",
        "Label Studio ML backend: smart keypoints/rectangles -> brush masks; --auto pre-labels whole tasks "
        "(pip install 'samkit[labelstudio]')",
    )
    _add_model(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9090)
    p.add_argument("--auto", action="store_true", help="answer prompt-less /predict with segment-everything")
    p.add_argument(
        "--points-per-side",
        type=int,
        default=GeneratorSettings.points_per_side,
        help=f"--auto: N x N prompts (default {GeneratorSettings.points_per_side})",
    )
    p.add_argument(
        "--pred-iou-thresh",
        type=float,
        default=GeneratorSettings.pred_iou_thresh,
        help="--auto: keep masks above this predicted IoU",
    )
    p.add_argument(
        "--prompts",
        choices=["grid", "learned"],
        default=GeneratorSettings.prompts,
        help=f"--auto: {GENERATOR_HELP['prompts']} (default {GeneratorSettings.prompts})",
    )
    p.add_argument(
        "--prompt-head",
        default=GeneratorSettings.prompt_head,
        metavar="FILE",
        help=f"--auto, learned: {PROMPT_HEAD_HELP}",
    )
    p.add_argument("--auto-label", default=None, help="--auto: BrushLabels label (default: the first)")
    p.add_argument(
        "--label-studio-url",
        default=os.environ.get("LABEL_STUDIO_URL"),
        help="server to fetch uploaded images from ($LABEL_STUDIO_URL; default: as Label Studio reports it)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("LABEL_STUDIO_API_KEY"),
        help="Label Studio API token ($LABEL_STUDIO_API_KEY; default: the one Label Studio sends on connect)",
    )
    p.add_argument(
        "--allow-root",
        action="append",
        default=[],
        metavar="DIR",
        help="read local-storage images from disk only under DIR (repeatable); without it they are fetched "
        "through Label Studio",
    )
    p.add_argument(
        "--document-root",
        default=os.environ.get("LOCAL_FILES_DOCUMENT_ROOT"),
        help="Label Studio's LOCAL_FILES_DOCUMENT_ROOT (default: that variable)",
    )
    p.add_argument("--cache-dir", default=None, help="embedding cache (default $SAMKIT_HOME/labelstudio)")
    p.add_argument("--max-embeddings", type=int, default=256, help="LRU bound of the embedding cache")
    p.set_defaults(func=_cmd_labelstudio)

    p = command("import", "load COCO or SA-1B annotations into a project, to correct them in the annotator")
    p.add_argument("files", nargs="+", help="COCO instances JSON, SA-1B JSONs, or folders of SA-1B JSONs")
    p.add_argument("--db", required=True, help="project database (created if missing)")
    p.add_argument("--images", default=None, help="images folder (needed when the database is new)")
    p.set_defaults(func=_cmd_import)

    return parser


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if given[:2] == ["export", "onnx"]:
        moved = (
            "`samkit export` writes annotations; models go to ONNX with `samkit export-onnx` (same options)"
        )
        print(f"samkit: error: {moved}", file=sys.stderr)
        return 2
    args = _build_parser().parse_args(argv)
    try:
        args.func(args)
    except SamkitError as exc:
        print(f"samkit: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a read-only or full disk, a file where a folder should be: it says which
        print(f"samkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # `samkit train` says what it kept, and exits 143 on SIGTERM
        print(f"samkit: {str(exc) or 'interrupted'}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 130))
    return 0


if __name__ == "__main__":
    sys.exit(main())
