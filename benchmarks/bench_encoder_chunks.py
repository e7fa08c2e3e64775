"""The image encoder's attention stages with and without token chunks (`_TOKEN_CHUNK`), same process.

`vit_t` encodes one coco_mini/train photo, alternating chunked and whole-map rounds; prints the median
seconds per encoding of each and checks that both give the same embedding, bit for bit.

    python benchmarks/bench_encoder_chunks.py --threads 1 2 --dtype fp32 auto
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "datasets" / "instances" / "coco_mini" / "train" / "images"


def main() -> None:
    import samkit
    from samkit.decoding import EmbeddedImage
    from samkit.hardware import run_header
    from samkit.image import load_image
    from samkit.models import tiny_vit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtype", nargs="+", default=["fp32", "auto"])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(run_header("fp32"))
    print(f"date {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    image = load_image(sorted(PHOTOS.iterdir())[0])
    chunk = tiny_vit._TOKEN_CHUNK
    whole = 10**9  # a chunk size no stage reaches: the whole map at once
    print("| dtype | threads | chunked s | whole map s | ratio | same embedding |")
    print("|---|---|---|---|---|---|")
    for dtype in args.dtype:
        model = samkit.load("vit_t", dtype=dtype)
        for threads in args.threads:
            torch.set_num_threads(threads)
            times: dict[int, list[float]] = {chunk: [], whole: []}
            out = {}
            for _ in range(args.rounds + 1):  # the first round warms up
                for size in times:
                    tiny_vit._TOKEN_CHUNK = size
                    t0 = time.perf_counter()
                    out[size] = EmbeddedImage.encode(model, image).features
                    times[size].append(time.perf_counter() - t0)
            tiny_vit._TOKEN_CHUNK = chunk
            a, b = (statistics.median(v[1:]) for v in times.values())
            same = torch.equal(out[chunk], out[whole])
            print(f"| {dtype} | {threads} | {a:.3f} | {b:.3f} | {a / b:.2f} | {same} |")


if __name__ == "__main__":
    main()
