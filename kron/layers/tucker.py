"""Tucker-2 convolution (Kim, Park, Yoo, Choi, Yang and Shin, ICLR 2016)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from kron.layers.errors import FactorizationError
from kron.layers.lowrank_base import LowRankConv2d, Stage
from kron.layers.lowrank_checks import check_rank, svd64


class TuckerMaxRank(NamedTuple):
    """The largest Tucker-2 ranks, ``(input_rank, output_rank)``: the constructor's order, so
    ``TuckerConv2d(..., TuckerConv2d.max_rank(...))`` builds the full-rank layer."""

    input_rank: int
    output_rank: int


class TuckerConv2d(LowRankConv2d):
    """1x1 conv ``C -> R_in``, ``kh x kw`` core ``R_in -> R_out``, 1x1 ``R_out -> F`` (+ bias),
    per group.

    Each group's kernel is ``W[f, c, i, j] = sum_{a, b} U_out[f, b] G[b, a, i, j] U_in[a, c]``:
    a Tucker decomposition in the two channel modes only (Tucker-2). ``ranks = (R_in, R_out)``
    per group, ``1 <= R_in <= C/g``, ``1 <= R_out <= F/g``. The core takes the layer's stride,
    padding and dilation, so the layer equals ``nn.Conv2d`` holding ``dense_weight()``.
    Parameters: ``weight_in (g*R_in, C/g, 1, 1)``, ``weight_core (g*R_out, R_in, kh, kw)``,
    ``weight_out (F, R_out, 1, 1)``, ``bias (F,)``.
    """

    init_order = ("weight_in", "weight_core", "weight_out")

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 ranks: Sequence[int], stride: int | Sequence[int] = 1,
                 padding: str | int | Sequence[int] = 0, dilation: int | Sequence[int] = 1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None
                 ) -> None:
        """As :class:`LowRankConv2d`, with ``ranks = (input_rank, output_rank)`` per group."""
        super().__init__(in_channels, out_channels, kernel_size, ranks, stride, padding,
                         dilation, groups, bias, padding_mode, device, dtype)

    def _take_rank(self, ranks: Sequence[int]) -> None:
        a, name = self.args, type(self).__name__
        if not isinstance(ranks, Sequence) or isinstance(ranks, str) or len(ranks) != 2:
            raise FactorizationError(f"{name}({self._dims()}): ranks must be "
                                     f"(input_rank, output_rank), got {ranks!r}")
        top = self.max_rank(a.in_channels, a.out_channels, a.kernel_size, a.groups)
        r_in = check_rank(name, self._dims(), "input_rank", ranks[0], top.input_rank, a.groups)
        r_out = check_rank(name, self._dims(), "output_rank", ranks[1], top.output_rank,
                           a.groups)
        self.ranks, self.init_terms = (r_in, r_out), r_in * r_out

    def _factors(self, device, dtype) -> tuple[Stage, ...]:
        (r_in, r_out), a = self.ranks, self.args
        g, (kh, kw) = a.groups, a.kernel_size
        self._add("weight_in", (g * r_in, a.in_channels // g, 1, 1), device, dtype)
        self._add("weight_core", (g * r_out, r_in, kh, kw), device, dtype)
        self._add("weight_out", (a.out_channels, r_out, 1, 1), device, dtype)
        return (Stage("weight_in", g), self._spatial("weight_core", g), Stage("weight_out", g))

    @classmethod
    def max_rank(cls, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 groups: int = 1) -> TuckerMaxRank:
        """``(C/g, F/g)`` as ``(input_rank, output_rank)``, the order of the constructor's
        ``ranks``."""
        f, c, _, _ = cls.group_shape(in_channels, out_channels, kernel_size, groups)
        return TuckerMaxRank(input_rank=c, output_rank=f)

    def _rank_repr(self) -> str:
        return f"ranks={self.ranks}"

    def _compose(self) -> torch.Tensor:
        u_out = self.grouped("weight_out")[..., 0, 0]  # (g, f, r_out)
        u_in = self.grouped("weight_in")[..., 0, 0]  # (g, r_in, c)
        return torch.einsum("gfb,gbaij,gac->gfcij", u_out, self.grouped("weight_core"), u_in)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ranks: Sequence[int]) -> TuckerConv2d:
        """HOSVD fit, per group: ``U_out``, ``U_in`` are the leading left singular vectors of
        the mode-0 (``F/g x C/g kh kw``) and mode-1 (``C/g x F/g kh kw``) unfoldings, and the
        core is the kernel projected onto them, ``G = W x_0 U_out^T x_1 U_in^T``.

        The result is the orthogonal projection of W onto those subspaces: exact when W has
        multilinear ranks at most ``(R_out, R_in)`` in the channel modes (always at
        ``max_rank``: the full bases are orthogonal, even past a short unfolding's rank),
        within a factor sqrt(2) of the best Tucker-2 fit in general, but NOT optimal (De
        Lathauwer, De Moor and Vandewalle 2000; HOOI iterations can lower the error).
        """
        layer, kernel = cls._like(conv, ranks=ranks)
        (r_in, r_out), (g, f, c) = layer.ranks, kernel.shape[:3]
        u_out = svd64(kernel.reshape(g, f, -1), full=True)[0][..., :r_out]
        u_in = svd64(kernel.transpose(1, 2).reshape(g, c, -1), full=True)[0][..., :r_in]
        core = torch.einsum("gfcij,gfb,gca->gbaij", kernel, u_out, u_in)
        layer._load({"weight_out": u_out, "weight_core": core,
                     "weight_in": u_in.transpose(1, 2)}, conv.bias)
        return layer
