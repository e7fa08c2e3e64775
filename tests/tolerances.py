"""How far two correct fp32 implementations of the same model may differ: the one bound every parity test uses.

Derivation. Each fp32 operation rounds its result with a relative error of at most u = eps / 2 (eps =
2**-23, `EPS32`). A reduction over `width` terms (a matrix product, a norm) done in a different order
(another kernel: AVX2 vs AVX-512 FMA widths, a different blocking, another library) rounds differently;
the differences behave like a random walk, so one stage's output carries noise of about
u * sqrt(width) relative to the magnitude of the values it works on. Stages in sequence (`depth`: encoder
blocks plus the neck and decoder layers) add independent noise, and residual streams keep it at the
stream's scale, so the noise of an output is about sigma = u * sqrt(width * depth) * scale, with scale the
largest |value| of that output (logits near |40| carry 40x the absolute noise of logits near |1|: this is
why the bound is relative to the tensor's scale, not to each element, and not a fixed absolute number).
Two implementations each carry such noise: their difference has sqrt(2) * sigma, and the largest of up to
~10^7 compared values sits within sqrt(2 ln 10^7) ~ 5.7 standard deviations. Together:

    atol = 5.7 * sqrt(2) / 2 * eps * sqrt(width * depth) * scale  ~  4 * eps * sqrt(width * depth) * scale

For MobileSAM's logits (scale 40, depth 12 + 5, width 256) that is 1.3e-3, i.e. 3e-5 of the scale;
measured differences are 1e-4 .. 3e-4 (AVX-512 and AVX2 machines). A real defect (a missing bias, a wrong
normalisation, a shifted coordinate) moves logits by 1e-2 or more, far outside it.

Masks stay held to equality: a pixel may differ only where the reference logit itself lies within
`atol` of the threshold (`assert_masks_equal`), and predicted scores (already on a 0..1 scale) within
the same bound at their own scale.
"""

from __future__ import annotations

import math
import os

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)
K = 4.0  # 5.7 standard deviations of the difference of two independent roundings, see above
WIDTH = 256  # channels of SAM's embedding and decoder: the length of the reductions behind each logit
DECODER_DEPTH = 5  # neck, two two-way attention layers, the final token-to-image attention, upscaling


def fp32_atol(scale: float, depth: int, width: int = WIDTH) -> float:
    """Largest difference two correct fp32 implementations may show on an output whose largest |value| is
    `scale`, after `depth` sequential stages of reductions over `width` terms (see the module docstring). A scale
    below 1 counts as 1: the intermediate values the noise comes from (normalised activations) are ~1."""
    return K * EPS32 * math.sqrt(width * depth) * max(float(scale), 1.0)


def sam_depth(model) -> int:
    """Sequential stages from pixels to logits of a samkit `Sam`: encoder blocks + neck and decoder."""
    config = model.config
    blocks = sum(config.tiny_depths) if config.encoder in ("tiny_vit", "nano") else config.depth
    return int(blocks) + DECODER_DEPTH


def assert_close_at_scale(ours, ref, depth: int, what: str = "logits", width: int = WIDTH) -> float:
    """|ours - ref| <= fp32_atol(max|ref|, depth) everywhere; returns the bound (for mask checks)."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"{what}: shapes {ours.shape} vs {ref.shape}"
    atol = fp32_atol(np.abs(ref).max(initial=0.0), depth, width)
    diff = float(np.abs(ours - ref).max(initial=0.0))
    if os.environ.get("SAMKIT_TOLERANCE_LOG"):  # measured margins, for re-deriving K on a new machine
        with open(os.environ["SAMKIT_TOLERANCE_LOG"], "a") as log:
            log.write(
                f"{what}\tdepth {depth}\tscale {np.abs(ref).max():.4g}\tdiff {diff:.3g}\tatol {atol:.3g}\n"
            )
    assert diff <= atol, (
        f"{what} differ by {diff:.3g} > {atol:.3g} (fp32 bound at scale {np.abs(ref).max():.3g})"
    )
    return atol


def assert_masks_equal(ours, theirs, ref_logits, atol: float) -> None:
    """Same masks, except pixels whose reference logit is within `atol` of the 0 threshold."""
    differ = np.asarray(ours) != np.asarray(theirs)
    near = np.abs(np.asarray(ref_logits)[differ])
    assert (near <= atol).all(), (
        f"{differ.sum()} mask pixels differ, some {near.max():.3g} from the threshold"
    )
