"""Per-layer speed of the ViT encoder's attention (vit_b sizes, 1024 input): samkit vs the reference, same run.

    python benchmarks/bench_attention.py [--repeats 7] [--threads 2] [--variants]

One attention layer (qkv projection, decomposed rel-pos bias, softmax, output projection) with the same
random weights in samkit's `Attention` and `segment_anything`'s: a global layer over the 64 x 64 token grid
(12 heads) and a windowed layer over the 25 windows of 14 x 14 tokens (the 64 x 64 grid padded to 70 x 70).
fp32, and bf16 = CPU autocast as `samkit.load(..., dtype="bf16")` runs the encoder. Implementations are
interleaved round after round; the table gives the median. `--variants` adds the alternatives measured
while choosing samkit's path (attention core only, on the same q, k, v):
  row_blocks_2   the previous samkit path: 2 query rows of all heads per block, bias and softmax in place
  augmented_sdpa bias folded into the dot product ([q*s, q.Rh, q.Rw] . [k, onehot(row), onehot(col)]),
                 then torch's fused SDPA with no mask; the CPU kernel needs v padded to the same head dim
  sdpa_no_bias   SDPA without the bias: NOT a correct result, a floor for what any bias scheme could reach
Max |diff| is against the reference layer in fp32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT.parent / "shared" / "refshim"))

from segment_anything.modeling.image_encoder import Attention as RefAttention  # noqa: E402

from samkit.models.vit import Attention, get_rel_pos  # noqa: E402

DIM, HEADS = 768, 12
LAYERS = {"global": (1, 64), "window": (25, 14)}  # (batch of grids, grid side)


def _qkv(attn: Attention, x: torch.Tensor):
    b, h, w, _ = x.shape
    qkv = attn.qkv(x).reshape(b, h * w, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * HEADS, h * w, -1).unbind(0)
    rh = get_rel_pos(h, h, attn.rel_pos_h).to(q.dtype)
    rw = get_rel_pos(w, w, attn.rel_pos_w).to(q.dtype)
    return q, k, v, rh, rw


def _core(attn: Attention, x: torch.Tensor, core) -> torch.Tensor:
    """A whole layer with `core(q, k, v, rh, rw, h, w, scale)` in place of samkit's attention core."""
    b, h, w, _ = x.shape
    q, k, v, rh, rw = _qkv(attn, x)
    out = core(q, k, v, rh, rw, h, w, attn.scale)
    return attn.proj(out.view(b, HEADS, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1))


def row_blocks_2(q, k, v, rh, rw, h, w, scale):
    out = torch.empty_like(q)
    kt = k.transpose(1, 2).contiguous()
    rq = q.reshape(-1, h, w, q.shape[-1])
    for r0 in range(0, h, 2):
        r1 = min(h, r0 + 2)
        qb = rq[:, r0:r1]
        attn = (qb * scale).reshape(qb.shape[0], -1, qb.shape[-1]) @ kt
        grid = attn.view(-1, r1 - r0, w, h, w)
        grid.add_(torch.einsum("bhwc,hkc->bhwk", qb, rh[r0:r1])[..., None])
        grid.add_(torch.einsum("bhwc,wkc->bhwk", qb, rw)[..., None, :])
        attn.sub_(attn.amax(-1, keepdim=True)).exp_()
        sums = attn.sum(-1, keepdim=True).float()
        out[:, r0 * w : r1 * w] = ((attn @ v).float() / sums).to(out.dtype)
    return out


def augmented_sdpa(q, k, v, rh, rw, h, w, scale):
    bh, n, c = q.shape
    rq = q.view(bh, h, w, c)
    rel_h = torch.einsum("bhwc,hkc->bhwk", rq, rh).reshape(bh, n, h)
    rel_w = torch.einsum("bhwc,wkc->bhwk", rq, rw).reshape(bh, n, w)
    index = torch.arange(n)
    onehot = torch.zeros(n, h + w, dtype=q.dtype)
    onehot[index, index // w] = 1
    onehot[index, h + index % w] = 1
    qa = torch.cat([q * scale, rel_h.to(q.dtype), rel_w.to(q.dtype)], -1)
    ka = torch.cat([k, onehot.expand(bh, n, h + w)], -1)
    va = F.pad(v, (0, h + w))
    return F.scaled_dot_product_attention(qa[:, None], ka[:, None], va[:, None], scale=1.0)[:, 0, :, :c]


def sdpa_no_bias(q, k, v, rh, rw, h, w, scale):
    return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], scale=scale)[:, 0]


def main() -> None:
    from samkit.hardware import run_header

    print(run_header("fp32", "bf16"), flush=True)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(
        "| layer | dtype | impl | median ms | ratio vs reference (same dtype) | max abs diff vs reference fp32 |"
    )
    print("|---|---|---|---|---|---|")
    for layer, (batch, side) in LAYERS.items():
        torch.manual_seed(0)
        ref = RefAttention(DIM, HEADS, qkv_bias=True, use_rel_pos=True, input_size=(side, side)).eval()
        with torch.no_grad():
            ref.rel_pos_h.normal_(0, 0.3)
            ref.rel_pos_w.normal_(0, 0.3)
        ours = Attention(DIM, HEADS, (side, side)).eval()
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(batch, side, side, DIM)
        impls = {"reference": ref, "samkit": ours}
        if args.variants:
            for core in (row_blocks_2, augmented_sdpa, sdpa_no_bias):
                impls[core.__name__] = lambda x, core=core, attn=ours: _core(attn, x, core)
        with torch.inference_mode():
            expected = ref(x)
        for dtype in ("fp32", "bf16"):
            times: dict[str, list[float]] = {name: [] for name in impls}
            diffs = {}
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bf16"):
                for name, fn in impls.items():
                    diffs[name] = (fn(x).float() - expected).abs().max().item()
                for _ in range(args.repeats):
                    for name, fn in impls.items():
                        start = time.perf_counter()
                        fn(x)
                        times[name].append(time.perf_counter() - start)
            base = statistics.median(times["reference"])
            for name in impls:
                ms = statistics.median(times[name])
                note = " (no bias: not a correct result)" if name == "sdpa_no_bias" else ""
                print(
                    f"| {layer} | {dtype} | {name}{note} | {ms * 1e3:.1f} | {ms / base:.2f} | {diffs[name]:.1e} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
