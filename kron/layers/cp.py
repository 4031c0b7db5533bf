"""CP-decomposed convolution (Lebedev, Ganin, Rakhuba, Oseledets and Lempitsky, ICLR 2015)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from kron.layers.cp_als import cp_als, cp_exact
from kron.layers.lowrank_base import LowRankConv2d, Stage


def cp_max_rank(out_channels: int, in_channels: int, kh: int, kw: int) -> int:
    """Trivial CP-rank bound of a ``(F, C, kh, kw)`` kernel, ``numel / max dim``: every such
    tensor has an exact CP decomposition of this rank (``cp_exact`` builds it)."""
    dims = (out_channels, in_channels, kh, kw)
    return math.prod(dims) // max(dims)


class CPConv2d(LowRankConv2d):
    """1x1 conv ``C -> R``, depthwise ``(kh x 1)``, depthwise ``(1 x kw)``, 1x1 ``R -> F``
    (+ bias), per group.

    Each group's kernel is ``W[f, c, i, j] = sum_r U_f[f, r] U_c[c, r] U_h[i, r] U_w[j, r]``,
    a rank-R CP decomposition. The vertical depthwise stage takes the vertical stride and
    dilation, the horizontal one the horizontal ones, so the layer equals ``nn.Conv2d``
    holding ``dense_weight()``. "Full rank" here is the trivial bound
    ``numel / max(F/g, C/g, kh, kw)`` per group (:meth:`max_rank`), at which every kernel is
    exactly representable; a kernel's true CP rank can be lower, but finding it is NP-hard
    (Hastad 1990), and ALS below the bound need not reach it. Parameters: ``weight_in (g*R,
    C/g, 1, 1)``, ``weight_vertical (g*R, 1, kh, 1)``, ``weight_horizontal (g*R, 1, 1, kw)``,
    ``weight_out (F, R, 1, 1)``, ``bias (F,)``.
    """

    init_order = ("weight_in", "weight_vertical", "weight_horizontal", "weight_out")

    def _factors(self, device, dtype) -> tuple[Stage, ...]:
        a, r = self.args, self.rank
        g, (kh, kw) = a.groups, a.kernel_size
        self._add("weight_in", (g * r, a.in_channels // g, 1, 1), device, dtype)
        self._add("weight_vertical", (g * r, 1, kh, 1), device, dtype)
        self._add("weight_horizontal", (g * r, 1, 1, kw), device, dtype)
        self._add("weight_out", (a.out_channels, r, 1, 1), device, dtype)
        return (Stage("weight_in", g), self._spatial("weight_vertical", g * r, "h"),
                self._spatial("weight_horizontal", g * r, "w", first=False),
                Stage("weight_out", g))

    @classmethod
    def max_rank(cls, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 groups: int = 1) -> int:
        """:func:`cp_max_rank` of one group's ``(F/g, C/g, kh, kw)`` kernel."""
        return cp_max_rank(*cls.group_shape(in_channels, out_channels, kernel_size, groups))

    def _compose(self) -> torch.Tensor:
        return torch.einsum("gfr,grc,gri,grj->gfcij", self.grouped("weight_out")[..., 0, 0],
                            self.grouped("weight_in")[..., 0, 0],
                            self.grouped("weight_vertical")[:, :, 0, :, 0],
                            self.grouped("weight_horizontal")[:, :, 0, 0, :])

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int, n_iter_max: int = 1000, tol: float = 1e-9,
                  seed: int = 0) -> CPConv2d:
        """Fit each group by CP-ALS in float64 (``kron.layers.cp_als``), deterministic from an
        SVD start; at :meth:`max_rank` the exact construction of ``cp_exact`` instead.

        ALS is a local method: it finds a good, not necessarily the best, rank-R fit (the best
        may not even exist, de Silva and Lim 2008).
        """
        layer, kernel = cls._like(conv, rank=rank)
        fits = [cp_exact(k) if layer.rank == cp_max_rank(*k.shape)
                else cp_als(k, layer.rank, n_iter_max=n_iter_max, tol=tol, seed=seed)[0]
                for k in kernel]
        u_f, u_c, u_h, u_w = (torch.stack(mode) for mode in zip(*fits))  # (g, dim, R) each
        layer._load({"weight_out": u_f, "weight_in": u_c.transpose(1, 2),
                     "weight_vertical": u_h.transpose(1, 2),
                     "weight_horizontal": u_w.transpose(1, 2)}, conv.bias)
        return layer
