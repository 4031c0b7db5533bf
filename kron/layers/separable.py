"""Spatially separable low-rank convolution (Jaderberg, Vedaldi and Zisserman 2014, scheme 2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kron.layers.lowrank_base import LowRankConv2d, Stage
from kron.layers.lowrank_checks import svd64


class SeparableConv2d(LowRankConv2d):
    """A ``(kh x 1)`` conv ``C -> rank`` then a ``(1 x kw)`` conv ``rank -> F`` (+ bias), per
    group.

    Each group's kernel is ``W[f, c, i, j] = sum_r H[f, r, j] V[r, c, i]``: the
    ``(C/g * kh) x (F/g * kw)`` matrix ``W[(c, i), (f, j)]`` has rank ``rank``. The vertical
    stage takes the vertical stride and dilation, the horizontal stage the horizontal ones, so
    the layer equals ``nn.Conv2d`` with the same arguments holding ``dense_weight()``.
    Parameters: ``weight_vertical (groups*rank, C/g, kh, 1)``, ``weight_horizontal (F, rank,
    1, kw)``, ``bias (F,)``.
    """

    init_order = ("weight_vertical", "weight_horizontal")

    def _factors(self, device, dtype) -> tuple[Stage, ...]:
        a = self.args
        g, (kh, kw) = a.groups, a.kernel_size
        self._add("weight_vertical", (g * self.rank, a.in_channels // g, kh, 1), device, dtype)
        self._add("weight_horizontal", (a.out_channels, self.rank, 1, kw), device, dtype)
        return (self._spatial("weight_vertical", g, "h"),
                self._spatial("weight_horizontal", g, "w", first=False))

    @classmethod
    def max_rank(cls, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 groups: int = 1) -> int:
        """``min(C/g * kh, F/g * kw)``: the rank of each group's ``(c, i) x (f, j)`` matrix."""
        f, c, kh, kw = cls.group_shape(in_channels, out_channels, kernel_size, groups)
        return min(c * kh, f * kw)

    def _compose(self) -> torch.Tensor:
        vertical = self.grouped("weight_vertical")[..., 0]  # (g, r, c, kh)
        horizontal = self.grouped("weight_horizontal")[:, :, :, 0, :]  # (g, f, r, kw)
        return torch.einsum("gfrj,grci->gfcij", horizontal, vertical)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int) -> SeparableConv2d:
        """Optimal fit (Frobenius norm, per group): truncated SVD of each group's
        ``(C/g * kh) x (F/g * kw)`` matrix ``W[(c, i), (f, j)]``, the singular values split
        evenly between the stages; exact at ``max_rank``."""
        layer, kernel = cls._like(conv, rank=rank)
        g, f, c, kh, kw = kernel.shape
        r = layer.rank
        p, s, qh = svd64(kernel.permute(0, 2, 3, 1, 4).reshape(g, c * kh, f * kw))
        root = s[:, :r].sqrt()
        vertical = (p[:, :, :r] * root[:, None, :]).transpose(1, 2)  # (g, r, c*kh)
        horizontal = (root[:, :, None] * qh[:, :r]).reshape(g, r, f, kw).transpose(1, 2)
        layer._load({"weight_vertical": vertical, "weight_horizontal": horizontal}, conv.bias)
        return layer
