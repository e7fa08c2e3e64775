"""The mask decoder's image tokens in factored form, for decoding many prompts on one image on a CPU.

In SAM's two-way transformer every prompt changes the image tokens only through two image->token
attentions, each a sum over a few tokens and heads: u = A V with A the (N, T*H) attention weights and V
the (T*H, C) per-head values mapped through the output projection. With the layer norms after them, the
image tokens after block l are

    X_l = alpha_l * base_l + Z_l^T @ B_l      (per image token i: alpha_l[i] * base_l[i] + Z_l[:, i] @ B_l)

where base_l (N, C) depends on the image only (the first block's input tokens, centred and scaled by the
norms' gains), alpha_l (N,) are the norms' inverse deviations, and Z_l (r, N), B_l (r, C) grow by
T*H + 1 rows per block (57 and 114 for one point: 7 tokens, 8 heads). Every product of X_l with a fixed
matrix (the next attentions' projections, the first transposed convolution of the mask head) is then
alpha_l * (base_l @ W) with base_l @ W computed once per image, plus the small Z_l^T @ (B_l @ W). The
norms' statistics come from the same pieces (centred, in fp32): ||x||^2 = alpha^2 ||base||^2 +
2 alpha base . (Z^T B) + Z^T (B B^T) Z, where base . B's rows reduce to products of the base with the
output projections' weights, cached too. Same arithmetic as the plain decoder up to float rounding;
for one point with 3 masks the matrix products of the transformer and mask head take 0.87 GFLOP instead
of 1.63, and no step passes over the (N, C) image tokens.

Only for SAM's decoder shape (two blocks of plain linear attention, no mask input, one image).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from samkit.models.common import softmax_tokens

if TYPE_CHECKING:
    from samkit.models.transformer import ImageSide


@dataclass(frozen=True)
class FactoredImage:
    """Per-image products for `factored_attend` (N image tokens, C channels, H heads of width d).

    Per-head products are laid out (H, d, N), except the values v2, vf: (H, N, d). q1: the first block's
    image->token query projection; sq1, sq2: (N,) squared norms of the centred tokens before the first
    and the second image norm; p1 (H, d, 2N): both times the first image->token output projection's
    weights (the second with the first norm's gain); p22: the second times the second block's; p1b, p21b,
    p22b, s21, p2c: (N,) their dot products with those biases, the gain and the first norm's bias; k2, v2,
    q2: block 2's key / value / query projections of base_2 (no bias); pe_k2, pe_q2: the positional
    encoding's; kf, vf, pe_kf: the final attention's of base_3 and the encoding; conv: (N, 4 C') base_3
    times the first transposed convolution's per-pixel rows.
    """

    q1: torch.Tensor
    sq1: torch.Tensor
    p1: torch.Tensor
    p1b: torch.Tensor
    sq2: torch.Tensor
    p21b: torch.Tensor
    s21: torch.Tensor
    p2c: torch.Tensor
    p22: torch.Tensor
    p22b: torch.Tensor
    k2: torch.Tensor
    v2: torch.Tensor
    pe_k2: torch.Tensor
    q2: torch.Tensor
    pe_q2: torch.Tensor
    kf: torch.Tensor
    vf: torch.Tensor
    pe_kf: torch.Tensor
    conv: torch.Tensor


@dataclass(frozen=True)
class FactoredKeys:
    """The image tokens after the transformer, (B, N, C) = alpha[..., None] * base + z^T @ b, for the mask
    head: alpha (B, N), z (B, r, N), b (B, r, C) whose last row has coefficient 1 on every token; conv:
    (N, 4 C') base times the first transposed convolution's per-pixel rows (`FactoredImage.conv`)."""

    alpha: torch.Tensor
    z: torch.Tensor
    b: torch.Tensor
    conv: torch.Tensor

    def select(self, rows: torch.Tensor) -> FactoredKeys:
        """The prompts `rows` (a boolean mask or indices over B)."""
        return FactoredKeys(self.alpha[rows], self.z[rows], self.b[rows], self.conv)

    def crop(self, h: int, w: int, rows: int, cols: int) -> FactoredKeys:
        """The top-left (rows, cols) tokens of the (h, w) grid of tokens, row-major."""
        b = self.alpha.shape[0]
        return FactoredKeys(
            self.alpha.view(b, h, w)[:, :rows, :cols].reshape(b, -1),
            self.z.view(b, -1, h, w)[..., :rows, :cols].reshape(b, self.z.shape[1], -1),
            self.b,
            self.conv.view(h, w, -1)[:rows, :cols].reshape(rows * cols, -1),
        )

    def linear_rows(self, weight: torch.Tensor, bias: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
        """F.linear(tokens, weight, bias) of tokens [i0:i1) as a function of (i0, i1) -> (B, i1 - i0, O).

        weight: (O, C), the one `conv` was made with."""
        bw = self.b @ weight.t()
        bw[:, -1] += bias  # the last row's coefficient is 1 on every token

        def rows(i0: int, i1: int) -> torch.Tensor:
            out = self.z[:, :, i0:i1].transpose(1, 2) @ bw
            return out.addcmul_(self.conv[i0:i1], self.alpha[:, i0:i1, None])

        return rows


def supported_shape(transformer: nn.Module) -> bool:
    """Whether `transformer` has the shape this form is written for (SAM's: two blocks, plain linears)."""
    layers = getattr(transformer, "layers", None)
    if layers is None or len(layers) != 2 or not hasattr(transformer, "final_attn_token_to_image"):
        return False
    attns = [transformer.final_attn_token_to_image]
    for layer in layers:
        attns += [layer.cross_attn_token_to_image, layer.cross_attn_image_to_token]
        if type(layer.norm4) is not nn.LayerNorm:
            return False
    return all(a._folds() for a in attns)


@torch.no_grad()
def factor_image(
    transformer: nn.Module,
    keys: torch.Tensor,
    key_pe: torch.Tensor,
    conv_rows: torch.Tensor,
    i2t_q: torch.Tensor,
) -> FactoredImage:
    """The per-image products for a (1, N, C) first-block input `keys` (embedding + no-mask embedding)
    and positional encoding `key_pe` (1, N, C). conv_rows: (4 C', C) the first transposed convolution
    as per-pixel rows; i2t_q: (1, N, P) the first block's image->token query projection."""
    l1, l2 = transformer.layers
    fin = transformer.final_attn_token_to_image
    h = fin.num_heads
    k0, pe = keys[0], key_pe[0]
    o1, o2 = l1.cross_attn_image_to_token.out_proj, l2.cross_attn_image_to_token.out_proj
    g1, c1, g2 = l1.norm4.weight, l1.norm4.bias, l2.norm4.weight
    kc1 = k0 - k0.mean(1, keepdim=True)
    base2 = kc1 * g1
    kc2 = base2 - base2.mean(1, keepdim=True)
    base3 = kc2 * g2
    kc2g = kc2 * g1
    t2i, i2t = l2.cross_attn_token_to_image, l2.cross_attn_image_to_token

    def heads(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # (H, d, N) of x @ weight.T
        return (weight @ x.t()).view(h, -1, x.shape[0]).contiguous()

    def values(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # (H, N, d) of x @ weight.T
        return (x @ weight.t()).view(x.shape[0], h, -1).transpose(0, 1).contiguous()

    return FactoredImage(
        q1=i2t_q[0].t().reshape(h, -1, k0.shape[0]).contiguous(),
        sq1=(kc1 * kc1).sum(1),
        p1=torch.cat([heads(kc1, o1.weight.t()), heads(kc2g, o1.weight.t())], -1),
        p1b=kc1 @ o1.bias,
        sq2=(kc2 * kc2).sum(1),
        p21b=kc2g @ o1.bias,
        s21=kc2g.sum(1),
        p2c=kc2 @ c1,
        p22=heads(kc2, o2.weight.t()),
        p22b=kc2 @ o2.bias,
        k2=heads(base2, t2i.k_proj.weight),
        v2=values(base2, t2i.v_proj.weight),
        pe_k2=heads(pe, t2i.k_proj.weight),
        q2=heads(base2, i2t.q_proj.weight),
        pe_q2=heads(pe, i2t.q_proj.weight),
        kf=heads(base3, fin.k_proj.weight),
        vf=values(base3, fin.v_proj.weight),
        pe_kf=heads(pe, fin.k_proj.weight),
        conv=base3 @ conv_rows.t(),
    )


def factored_attend(
    transformer: nn.Module, image: FactoredImage, side: ImageSide, tokens: torch.Tensor, keep: int
) -> tuple[torch.Tensor, FactoredKeys]:
    """`TwoWayTransformer.forward(None, None, tokens, side, keep)` with the image tokens factored:
    returns the kept tokens (B, keep, C) and the image tokens as `FactoredKeys`. side: the `ImageSide`
    `image` was made from; tokens: (B, T, C).

    Attention weights are laid out (B, H, T, N) (image tokens innermost) and the coefficients Z as
    (B, r, N): every product then runs over the long image dimension."""
    l1, l2 = transformer.layers
    b, t, c = tokens.shape
    n = image.sq1.shape[0]
    qpe = tokens

    # Block 1: the token side as in the plain form (its image side is cached), then the image->token
    # attention weights A1 and the per-head values, without forming the (N, C) update A1 V1.
    queries = l1.token_side(tokens, qpe, l1.side_to_image(side))
    att = l1.cross_attn_image_to_token
    h = att.num_heads
    d = att.q_proj.out_features // h
    kh = _heads(att.k_proj(queries + qpe), h) * d**-0.5
    a1 = softmax_tokens(kh @ image.q1)  # (B, H, T, N)
    vh1 = _heads(att.v_proj(queries), h)
    v1 = _values(att, vh1)  # (B, H*T, C)
    mv1 = v1.mean(-1)  # (B, H*T)
    v1c = v1 - mv1[..., None]
    a1f = a1.view(b, h * t, n)
    # Norm 1's statistics on the centred tokens kc1 + A1 V1c (and the first's part of norm 2's).
    cross, on_b1 = _weighted(a1, vh1 @ image.p1).unbind(1)
    cross = cross + image.p1b
    var = ((image.sq1 + 2 * cross + _quad(a1f, v1c)) / c).clamp_(min=0)  # a sum of squares: never below 0
    norm1 = l1.norm4
    alpha1 = torch.rsqrt(var + norm1.eps)  # (B, N)
    # All coefficients in one buffer, filled block by block: z1 = rows [0, r1), [z1; A2] = [0, r2),
    # then the final z2 = [alpha2 * [z1; A2]; 1] = all r2 + 1 rows.
    r1, r2 = h * t + 1, 2 * h * t + 1
    zbuf = a1f.new_empty(b, r2 + 1, n)
    z1 = zbuf[:, :r1]
    torch.mul(a1f, alpha1[:, None], out=zbuf[:, : r1 - 1])
    zbuf[:, r1 - 1] = 1
    zbuf[:, r2] = 1
    b1 = torch.cat([v1c * norm1.weight, norm1.bias.expand(b, 1, c)], 1)  # (B, H*T + 1, C)

    # Block 2 on X1 = alpha1 * base2 + z1^T @ b1.
    t2i = l2.cross_attn_token_to_image

    def to_image(q: torch.Tensor) -> torch.Tensor:
        return _tokens_to_image(t2i, q, alpha1, z1, b1, image.k2, image.pe_k2, image.v2)

    queries = l2.token_side(queries, qpe, to_image)
    att = l2.cross_attn_image_to_token
    kh = _heads(att.k_proj(queries + qpe), h) * d**-0.5
    bq = (b1 @ att.q_proj.weight.t()).view(b, -1, h, d).permute(0, 2, 3, 1)  # (B, H, d, r)
    scores = (kh @ image.q2).mul_(alpha1[:, None, None])
    _add_heads_product(scores, kh, image.pe_q2)
    scores.view(b, h * t, n).baddbmm_((kh @ bq).view(b, h * t, -1), z1)
    scores += kh @ att.q_proj.bias.view(h, d, 1)
    a2 = softmax_tokens(scores, out=zbuf[:, r1:r2].view(b, h, t, n))
    vh2 = _heads(att.v_proj(queries), h)
    v2 = _values(att, vh2)
    v2c = v2 - v2.mean(-1, keepdim=True)
    # Norm 2's statistics on the centred tokens alpha1 * kc2 + [z1; A2]^T @ [b1 centred; V2c].
    zc = zbuf[:, :r2]
    bc = torch.cat([b1 - b1.mean(-1, keepdim=True), v2c], 1)
    on_b1 = on_b1 + image.p21b - image.s21 * (mv1[:, None] @ a1f)[:, 0]
    on_v2 = _weighted(a2, vh2 @ image.p22)[:, 0] + image.p22b
    cross = alpha1 * on_b1 + image.p2c + on_v2
    var = ((alpha1 * alpha1 * image.sq2 + 2 * alpha1 * cross + _quad(zc, bc)) / c).clamp_(min=0)
    norm2 = l2.norm4
    alpha2 = torch.rsqrt(var + norm2.eps)
    alpha3 = alpha1 * alpha2
    z2 = zbuf
    zc.mul_(alpha2[:, None])
    b2 = torch.cat([bc * norm2.weight, norm2.bias.expand(b, 1, c)], 1)

    # The final token->image attention for the kept tokens.
    queries, qpe = queries[:, :keep], qpe[:, :keep]
    fin = transformer.final_attn_token_to_image
    attn = _tokens_to_image(fin, queries + qpe, alpha3, z2, b2, image.kf, image.pe_kf, image.vf)
    return transformer.norm_final_attn(queries + attn), FactoredKeys(alpha3, z2, b2, image.conv)


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """(B, T, H*d) -> (B, H, T, d)."""
    b, t, p = x.shape
    return x.view(b, t, h, p // h).transpose(1, 2)


def _add_heads_product(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    """out += x @ y in place, for (B, H, T, N) out, (B, H, T, d) x and per-image (H, d, N) y."""
    for i in range(out.shape[0]):
        out[i].baddbmm_(x[i], y)


def _values(att: nn.Module, vh: torch.Tensor) -> torch.Tensor:
    """Per-head values (B, H, T, d) through the output projection -> (B, H*T, C), each with a 1/H share of
    the bias (per head the softmax weights over tokens sum to 1, so the bias is added once)."""
    b, h, t, d = vh.shape
    wo = att.out_proj.weight.view(-1, h, d).permute(1, 2, 0)  # (H, d, C)
    return (vh @ wo + att.out_proj.bias / h).view(b, h * t, -1)


def _weighted(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """sum over (head, token) of weights a (B, H, T, N) times k values e (B, H, T, k * N) -> (B, k, N)."""
    b, h, t, n = a.shape
    return (a[:, :, :, None] * e.view(b, h, t, -1, n)).sum((1, 2))


def _quad(z: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """||z[b, :, i] @ basis[b]||^2 for every token: z (B, r, N), basis (B, r, C) -> (B, N)."""
    return (((basis @ basis.transpose(1, 2)) @ z) * z).sum(1)


def _tokens_to_image(
    att: nn.Module,
    q: torch.Tensor,
    alpha: torch.Tensor,
    z: torch.Tensor,
    basis: torch.Tensor,
    k_base: torch.Tensor,
    k_pe: torch.Tensor,
    v_base: torch.Tensor,
) -> torch.Tensor:
    """Attention of tokens q (B, T, C) over image tokens alpha * base + z^T @ basis (keys with the
    positional encoding added): k_base, k_pe (H, d, N) and v_base (H, N, d) are base's key / value and the
    encoding's key projections without bias. The key bias adds a per-row constant (softmax ignores it);
    the value bias passes unchanged (the weights sum to 1)."""
    b, t, _ = q.shape
    h, d, n = k_base.shape
    qh = _heads(att.q_proj(q), h) * d**-0.5  # (B, H, T, d)
    bk = (basis @ att.k_proj.weight.t()).view(b, -1, h, d).permute(0, 2, 3, 1)  # (B, H, d, r)
    scores = (qh @ k_base).mul_(alpha[:, None, None])
    _add_heads_product(scores, qh, k_pe)
    scores.view(b, h * t, n).baddbmm_((qh @ bk).view(b, h * t, -1), z)
    w = scores.softmax(-1)  # (B, H, T, N)
    bv = (basis @ att.v_proj.weight.t()).view(b, -1, h, d).transpose(1, 2)  # (B, H, r, d)
    out = (w * alpha[:, None, None]) @ v_base
    out += (w.view(b, h * t, n) @ z.transpose(1, 2)).view(b, h, t, -1) @ bv
    out += att.v_proj.bias.view(h, 1, d)
    return att.out_proj(out.transpose(1, 2).reshape(b, t, h * d))
