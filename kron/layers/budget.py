"""Budgets of the factory: the cost of a candidate replacement relative to its dense layer, and
the largest setting (rank, or Kronecker term shape) within a parameter / MAC budget.

Costs are never re-derived here: a candidate is built on ``device="meta"`` (no memory) and its
parameters are counted and its ``analytic_macs`` asked, so the layer classes stay the one home
of their geometry, rank bounds and cost formulas (docs/design.md, D3).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from kron.layers.conv_args import ConvArgs
from kron.layers.errors import FactorizationError

# A rank search never goes beyond this (every layer's own bound is far below it).
_RANK_CEILING = 1 << 24


def weight_params(module: nn.Module) -> int:
    """Parameters of ``module`` other than its bias (the budget compares weights only)."""
    bias = getattr(module, "bias", None)
    extra = bias.numel() if isinstance(bias, nn.Parameter) else 0
    return sum(p.numel() for p in module.parameters()) - extra


def dense_macs(module: nn.Module, input_shape: Sequence[int]) -> int:
    """MACs of the dense ``nn.Linear`` / ``nn.Conv2d`` on ``input_shape`` (bias not counted)."""
    if isinstance(module, nn.Linear):
        return math.prod(int(s) for s in input_shape[:-1]) * module.in_features * \
            module.out_features
    return ConvArgs.from_conv(module).dense_macs(tuple(input_shape))


@dataclass(frozen=True)
class Budget:
    """A parameter and/or MAC ratio bound against one dense layer (ratios of weights only)."""

    param_ratio: float | None
    mac_ratio: float | None
    dense_params: int
    dense_macs: int | None
    input_shape: tuple[int, ...] | None

    @classmethod
    def of(cls, module: nn.Module, param_ratio: float | None, mac_ratio: float | None,
           input_shape: Sequence[int] | None, label: str) -> Budget:
        """Check the ratios (positive; a MAC ratio needs ``input_shape``) and note the dense
        layer's own cost."""
        for key, value in (("param_ratio", param_ratio), ("mac_ratio", mac_ratio)):
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise FactorizationError(f"{label}: {key} must be a number > 0, got {value!r}")
        if mac_ratio is not None and input_shape is None:
            raise FactorizationError(f"{label}: mac_ratio={mac_ratio} needs the layer's "
                                     "input_shape (e.g. (1, C, H, W)); pass input_shape=")
        shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        macs = None if shape is None else dense_macs(module, shape)
        return cls(param_ratio, mac_ratio, module.weight.numel(), macs, shape)

    def ratios(self, candidate: nn.Module) -> tuple[float, float | None]:
        """``(param ratio, MAC ratio or None)`` of a built candidate against the dense layer."""
        p = weight_params(candidate) / self.dense_params
        if self.input_shape is None or not self.dense_macs:
            return p, None
        return p, candidate.analytic_macs(self.input_shape) / self.dense_macs

    def meets(self, candidate: nn.Module) -> bool:
        p, m = self.ratios(candidate)
        return ((self.param_ratio is None or p <= self.param_ratio * (1 + 1e-12))
                and (self.mac_ratio is None or (m is not None and m <= self.mac_ratio
                                                * (1 + 1e-12))))

    def describe(self) -> str:
        parts = [f"{k}={v:g}" for k, v in (("param_ratio", self.param_ratio),
                                           ("mac_ratio", self.mac_ratio)) if v is not None]
        return ", ".join(parts)

    def achievable(self, candidate: nn.Module) -> str:
        """The ratios a candidate reaches, in the words of the budget, e.g.
        ``param_ratio 0.1667, mac_ratio 0.3``."""
        p, m = self.ratios(candidate)
        out = f"param_ratio {p:.4g}"
        return out if m is None or self.mac_ratio is None else out + f", mac_ratio {m:.4g}"


def try_build(build: Callable[[object], nn.Module], setting: object) -> nn.Module | None:
    """``build(setting)``, or None when the layer class refuses that setting."""
    try:
        return build(setting)
    except (ValueError, TypeError):
        return None


def largest_rank(build: Callable[[int], nn.Module], budget: Budget, label: str,
                 what: Callable[[int], str]) -> int:
    """The largest rank whose (meta-built) layer exists and meets ``budget``.

    Cost grows with rank and the layer class refuses ranks above its bound, so "builds and
    fits" is monotone: doubling finds a bracket, bisection the edge. Rank 1 not fitting is a
    :class:`FactorizationError` naming the smallest achievable ratios (those of rank 1).
    ``build(1)``'s own refusal (groups, shape) propagates: the budget is not the blocker then.
    """
    first = build(1)
    if not budget.meets(first):
        raise FactorizationError(
            f"{label}: even {what(1)} exceeds {budget.describe()} (blocker: budget); smallest "
            f"achievable {budget.achievable(first)}")

    def fits(r: int) -> bool:
        m = try_build(build, r)
        return m is not None and budget.meets(m)

    lo, hi = 1, 2
    while hi <= _RANK_CEILING and fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # invariant: fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
