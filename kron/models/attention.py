"""``nn.MultiheadAttention`` with its projections as called modules, so surgery can factor them.

``F.multi_head_attention_forward`` reads the packed ``in_proj_weight`` and ``out_proj.weight``
directly: a factored replacement of either would never run. :class:`ProjectedMultiheadAttention`
holds the same weights as two ``nn.Linear`` it calls, ``in_proj`` (E -> 3E, query/key/value
packed as in ``in_proj_weight``) and ``out_proj``, and computes the same function with the same
call signature and outputs (docs/design.md, D3), so each projection can be swapped
like any Linear.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kron.layers.errors import FactorizationError


class ProjectedMultiheadAttention(nn.Module):
    """Multi-head attention ``softmax(q k^T / sqrt(d) + mask) v`` per head, with ``q, k, v``
    from the called ``in_proj`` and the heads mixed by the called ``out_proj``; built from an
    ``nn.MultiheadAttention`` by :meth:`from_mha` (equal outputs and attention weights)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0,
                 batch_first: bool = False, bias: bool = True) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise FactorizationError(f"embed_dim={embed_dim} is not divisible by "
                                     f"num_heads={num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.dropout, self.batch_first = dropout, batch_first
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> ProjectedMultiheadAttention:
        """The same attention, weights copied (on their device and dtype). Refuses the variants
        whose packed projection is not one ``E -> 3E`` map: separate key/value sizes,
        ``add_bias_kv``, ``add_zero_attn``."""
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise FactorizationError(
                "nn.MultiheadAttention with kdim/vdim != embed_dim, add_bias_kv or "
                "add_zero_attn has no packed E -> 3E projection to factor (blocker: shape)")
        w = mha.in_proj_weight
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.batch_first,
                  bias=mha.in_proj_bias is not None).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.in_proj.weight.copy_(w)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            for mine, theirs in ((new.in_proj.bias, mha.in_proj_bias),
                                 (new.out_proj.bias, mha.out_proj.bias)):
                if mine is not None and theirs is not None:
                    mine.copy_(theirs)
        return new.train(mha.training)

    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of ``(N, L, E)`` inputs; one call of ``in_proj`` for self-attention, else
        one per distinct input, keeping the matching third of its output."""
        e = self.embed_dim
        if query is key and key is value:
            return self.in_proj(query).split(e, dim=-1)
        q = self.in_proj(query)[..., :e]
        if key is value:
            k, v = self.in_proj(key)[..., e:].split(e, dim=-1)
            return q, k, v
        return q, self.in_proj(key)[..., e:2 * e], self.in_proj(value)[..., 2 * e:]

    def _mask(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
              n: int, lq: int, ls: int, is_causal: bool, like: torch.Tensor) -> torch.Tensor:
        """The additive ``(N, H, L, S)`` mask (``-inf`` where a bool mask says True)."""
        def additive(m: torch.Tensor) -> torch.Tensor:
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=like.dtype, device=like.device).masked_fill(
                    m, float("-inf"))
            return m.to(like.dtype)

        mask = torch.zeros((n, self.num_heads, lq, ls), dtype=like.dtype, device=like.device)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(lq, ls, dtype=torch.bool, device=like.device).triu(1)
        if attn_mask is not None:
            m = additive(attn_mask)
            mask = mask + (m if m.dim() == 2 else m.view(n, self.num_heads, lq, ls))
        if key_padding_mask is not None:
            mask = mask + additive(key_padding_mask).view(n, 1, 1, ls)
        return mask

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``nn.MultiheadAttention.forward``: ``(output, weights or None)``."""
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first or unbatched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, lq, _ = query.shape
        ls, h = key.shape[1], self.num_heads
        d = self.embed_dim // h
        q, k, v = (t.reshape(n, -1, h, d).transpose(1, 2) for t in self._project(query, key,
                                                                                  value))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)
        scores = scores + self._mask(attn_mask, key_padding_mask, n, lq, ls, is_causal, scores)
        weights = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        out = self.out_proj((weights @ v).transpose(1, 2).reshape(n, lq, self.embed_dim))
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, (weights.squeeze(0) if unbatched else weights)
