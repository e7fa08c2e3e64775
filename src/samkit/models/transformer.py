"""The mask decoder's two-way transformer: prompt tokens and image tokens attend to each other."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from samkit.models.common import MLPBlock, softmax_tokens
from samkit.models.factored import FactoredImage


class ImageSide(NamedTuple):
    """The first block's image-only work for one image (batch 1), reusable across prompts.

    keys: image tokens (1, HW, C); key_pe: their positional encoding (1, HW, C); t2i_k, t2i_v: the
    token->image attention's key/value projections; i2t_q: the image->token attention's query projection
    (each (1, HW, C / downsample_rate)); factored: the per-image products of the factored form
    (`samkit.models.factored`), where that form runs.
    """

    keys: torch.Tensor
    key_pe: torch.Tensor
    t2i_k: torch.Tensor
    t2i_v: torch.Tensor
    i2t_q: torch.Tensor
    factored: FactoredImage | None = None


class TwoWayTransformer(nn.Module):
    """`depth` two-way blocks, then a final token-to-image attention."""

    def __init__(
        self,
        depth: int = 2,
        embedding_dim: int = 256,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim, num_heads, mlp_dim, downsample_rate, skip_first_layer_pe=i == 0
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    @torch.no_grad()
    def image_side(self, image_embedding: torch.Tensor, image_pe: torch.Tensor) -> ImageSide:
        """Precompute the first block's image-only projections for a (1, C, H, W) image embedding."""
        # Token-major copies: every later elementwise op and layer norm on them runs on contiguous rows.
        keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
        key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        first = self.layers[0]
        k = keys + key_pe
        return ImageSide(
            keys,
            key_pe,
            first.cross_attn_token_to_image.k_proj(k),
            first.cross_attn_token_to_image.v_proj(keys),
            first.cross_attn_image_to_token.q_proj(k),
        )

    def forward(
        self,
        image_embedding: torch.Tensor | None,
        image_pe: torch.Tensor | None,
        point_embedding: torch.Tensor,
        image_side: ImageSide | None = None,
        keep: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embedding, image_pe: (B, C, H, W); point_embedding: (B, N, C).

        With `image_side` (from `image_side()` on the same image and PE) the embedding and PE are not
        needed and the first block skips its image-only projections. Returns the processed tokens
        (B, N, C) and image tokens (B, H*W, C). keep: return only the first `keep` tokens; the final
        attention then runs for those alone (each token's final attention and norm are its own, so
        they come out the same).
        """
        if image_side is not None:
            keys, key_pe = image_side.keys, image_side.key_pe
        else:
            keys = image_embedding.flatten(2).permute(0, 2, 1)
            key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = point_embedding
        for i, layer in enumerate(self.layers):
            side = image_side if i == 0 else None
            queries, keys = layer(queries, keys, point_embedding, key_pe, side)
        queries, point_embedding = queries[:, :keep], point_embedding[:, :keep]
        attn = self.final_attn_token_to_image.tokens_to_image(queries + point_embedding, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class TwoWayAttentionBlock(nn.Module):
    """Self-attention on tokens, token->image, MLP on tokens, image->token attention."""

    def __init__(
        self, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int, skip_first_layer_pe: bool
    ) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
        image_side: ImageSide | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_side: this block's precomputed image projections (first block only), or None."""
        if image_side is None:
            k = keys + key_pe
            queries = self.token_side(
                queries, query_pe, lambda q: self.cross_attn_token_to_image.tokens_to_image(q, k, keys)
            )
        else:
            k = None
            queries = self.token_side(queries, query_pe, self.side_to_image(image_side))
        q = queries + query_pe
        qp = image_side.i2t_q if image_side is not None else None
        keys = self.norm4(self.cross_attn_image_to_token.image_to_tokens(k, q, queries, qp=qp, residual=keys))
        return queries, keys

    def token_side(
        self,
        queries: torch.Tensor,
        query_pe: torch.Tensor,
        to_image: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The block's token updates (self-attention, token->image attention, MLP) -> queries (B, T, C).

        to_image: the token->image attention of the queries plus their encoding (B, T, C) -> (B, T, C)."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        queries = self.norm2(queries + to_image(queries + query_pe))
        return self.norm3(queries + self.mlp(queries))

    def side_to_image(self, image_side: ImageSide) -> Callable[[torch.Tensor], torch.Tensor]:
        """The token->image attention on a cached image side."""
        attn = self.cross_attn_token_to_image
        return lambda q: attn(q, None, None, kp=image_side.t2i_k, vp=image_side.t2i_v)


class Attention(nn.Module):
    """Multi-head attention whose internal width can be `downsample_rate` times smaller than its input."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        internal = embedding_dim // downsample_rate
        if internal % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the internal dimension {internal}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embedding_dim, internal)
        self.k_proj = nn.Linear(embedding_dim, internal)
        self.v_proj = nn.Linear(embedding_dim, internal)
        self.out_proj = nn.Linear(internal, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(
        self,
        q: torch.Tensor | None,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        qp: torch.Tensor | None = None,
        kp: torch.Tensor | None = None,
        vp: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: (B, Nq, C), k and v: (B, Nk, C) -> (B, Nq, C).

        qp / kp / vp, when given, are already-projected inputs (q_proj(q) etc.) used instead of q / k / v.
        """
        q = self._heads(qp if qp is not None else self.q_proj(q))
        k = self._heads(kp if kp is not None else self.k_proj(k))
        v = self._heads(vp if vp is not None else self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))

    def _folds(self) -> bool:
        return all(type(m) is nn.Linear for m in (self.q_proj, self.k_proj, self.v_proj, self.out_proj))

    def tokens_to_image(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of a few tokens q (B, T, C) over many image tokens k, v (B or 1, N, C) -> (B, T, C).

        Same result as `forward`, computed with the key and value projections moved to the token side:
        each head's query is mapped back through the key weights (scores = (W_k^T q) . k; the key bias
        adds a per-row constant, which softmax ignores), and the attention-weighted image tokens go through
        the value weights afterwards (softmax weights sum to 1, so the value bias passes unchanged). That
        costs 2 x N x (heads x T) x C multiply-adds instead of projecting all N image tokens twice.
        """
        if not self._folds():
            return self(q, k, v)
        b, t, c = q.shape
        h = self.num_heads
        d = self.q_proj.out_features // h
        qh = self.q_proj(q).view(b, t, h, d)
        wk = self.k_proj.weight.view(h, d, c)
        folded = torch.einsum("bthd,hdc->bthc", qh, wk).reshape(b, t * h, c) * d**-0.5
        weights = (folded @ k.transpose(1, 2)).softmax(-1)  # (B, T*H, N)
        mixed = (weights @ v).view(b, t, h, c)
        wv = self.v_proj.weight.view(h, d, c)
        out = torch.einsum("bthc,hdc->bthd", mixed, wv) + self.v_proj.bias.view(h, d)
        return self.out_proj(out.reshape(b, t, h * d))

    def image_to_tokens(
        self,
        q: torch.Tensor | None,
        k: torch.Tensor,
        v: torch.Tensor,
        qp: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of many image tokens q (B or 1, N, C) over a few tokens k, v (B, T, C) -> (B, N, C),
        plus `residual` (B or 1, N, C) when given.

        Same result as `forward`, with the query projection moved to the key side (or the projected
        queries `qp` (1, N, C') given) and the output projection folded into each head's values, so no
        (N, C) x (C, C') product runs on the image tokens. The residual and the output bias are added by
        the final product itself: each head's softmax weights sum to 1, so a 1/H share of the bias in
        every value row adds the bias once.
        """
        if not self._folds():
            out = self(q, k, v, qp=qp)
            return out if residual is None else residual + out
        b, t, c = k.shape
        h = self.num_heads
        d = self.q_proj.out_features // h
        kh = self.k_proj(k).view(b, t, h, d) * d**-0.5
        if qp is not None:
            n = qp.shape[1]
            scores = torch.einsum("nhd,bthd->bnth", qp[0].view(n, h, d), kh)
        else:
            n = q.shape[1]
            wq = self.q_proj.weight.view(h, d, c)
            folded = torch.einsum("bthd,hdc->bthc", kh, wq).reshape(b, t * h, c)
            bias = torch.einsum("bthd,hd->bth", kh, self.q_proj.bias.view(h, d)).reshape(b, 1, t * h)
            scores = torch.baddbmm(bias, q.expand(b, n, c) if q.shape[0] != b else q, folded.transpose(1, 2))
        # Scores laid out (token, head) per image token: the softmax over tokens then reduces over a
        # non-innermost dimension of 8 heads, ~4x faster on a CPU than over an innermost 7.
        weights = softmax_tokens(scores.reshape(b, n, t, h)).reshape(b, n, t * h)
        vh = self.v_proj(v).view(b, t, h, d)
        wo = self.out_proj.weight.view(-1, h, d)  # (C_out, H, d)
        values = torch.einsum("bthd,chd->bthc", vh, wo) + self.out_proj.bias / h
        if residual is None:
            residual = values.new_zeros(1, 1, values.shape[-1])
        return torch.baddbmm(residual, weights, values.reshape(b, t * h, -1))
