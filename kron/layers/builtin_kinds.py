"""kron's own layer kinds, registered in :mod:`kron.layers.kinds` (docs/design.md, D3).

``lowrank``, ``separable`` and ``cp`` are rank-knob kinds: their classes say everything.
``tucker`` has two ranks, ``(R_in, R_out)``; a budget turns one knob, the output rank, and keeps
``R_in / R_out`` near ``C / F``. ``kron`` takes ``terms`` (A shapes), a budget picks the single
A shape with the most parameters within it (Kronecker rank = copies of it), and its ``dense`` /
``fit`` inits differ for mixed shapes (see :func:`kron.layers.factory.factorize`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from kron.layers.budget import Budget, largest_rank, try_build
from kron.layers.errors import FactorizationError
from kron.layers.kinds import register_layer_kind
from kron.layers.kron_conv import KronConv2d
from kron.layers.kron_linear import KronLinear
from kron.layers.lowrank import CPConv2d, LowRankLinear, SeparableConv2d, TuckerConv2d

#: Block-coordinate sweeps of ``init="fit"`` for mixed Kronecker shapes (stops early at 1e-6).
FIT_SWEEPS = 100

Setting = Any  # kron: tuple of A shapes; lowrank/separable/cp: int; tucker: (r_in, r_out)


# --------------------------------------------------------------------------------- tucker


def _tucker_setting(terms: Any, rank: Any, ranks: Any) -> Setting:
    given = ranks if ranks is not None else rank
    return (int(given), int(given)) if isinstance(given, int) else tuple(given)


def _channels(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


def _tucker_search(module: nn.Module, budget: Budget, rank: int | None,
                   build: Callable[..., nn.Module], label: str) -> Setting:
    c, f = _channels(module)

    def tucker(r: int) -> tuple[int, int]:  # one knob: the input rank keeps C/F
        return (max(1, min(c, round(r * c / f))), r)

    r = largest_rank(lambda r: build(tucker(r)), budget, label, lambda r: f"ranks {tucker(r)}")
    return tucker(r)


# ----------------------------------------------------------------------------------- kron


def _kron_setting(terms: Any, rank: Any, ranks: Any) -> Setting:
    return tuple(tuple(int(v) for v in t) for t in terms) if not isinstance(terms, str) \
        else terms  # a string is refused by the class with its own message


def _kron_fit(module: nn.Module, setting: Setting, init: str, implementation: str
              ) -> nn.Module:
    cls = KronLinear.from_linear if isinstance(module, nn.Linear) else KronConv2d.from_conv
    if len(set(setting)) == 1:  # one shape: the SVD fit is optimal, no sweeps to choose
        return cls(module, list(setting), implementation=implementation)
    sweeps = FIT_SWEEPS if init == "fit" else 0
    return cls(module, list(setting), implementation=implementation, sweeps=sweeps)


def _per_group(module: nn.Module) -> nn.Module:
    """The dense layer one group of ``module`` is (a grouped conv is ``groups`` independent
    convs), on the meta device: what Kronecker term shapes are enumerated against."""
    if isinstance(module, nn.Linear) or (module.groups == 1
                                         and not isinstance(module.padding, str)):
        return module
    g = module.groups
    padding = module.padding if not isinstance(module.padding, str) else 0  # MACs: see caller
    return nn.Conv2d(module.in_channels // g, module.out_channels // g, module.kernel_size,
                     module.stride, padding, module.dilation, bias=False, device="meta")


def _kron_search(module: nn.Module, budget: Budget, rank: int | None,
                 build: Callable[..., nn.Module], label: str,
                 shape_rule: str = "most_params") -> Setting:
    """The single-shape rank-``rank`` terms ``shape_rule`` prefers within ``budget``
    (:data:`kron.layers.shapes.SHAPE_RULES`; default: the most parameters)."""
    from kron.layers.shapes import check_shape_rule, factorizations, preferred

    check_shape_rule(shape_rule, label)
    rank = 1 if rank is None else int(rank)
    proxy = _per_group(module)
    exact_macs = isinstance(module, nn.Linear) or not isinstance(module.padding, str)
    hw = budget.input_shape[-2:] if budget.input_shape and exact_macs and isinstance(
        module, nn.Conv2d) else None
    cands = factorizations(proxy, input_hw=hw, rank=rank)
    allowed = preferred(cands, shape_rule)
    if not allowed:
        rule = "" if shape_rule == "most_params" else f" allowed by shape_rule={shape_rule}"
        raise FactorizationError(
            f"{label}: no non-trivial rank-{rank} Kronecker split{rule} of a weight of shape "
            f"{tuple(proxy.weight.shape)} (blocker: shape); leave it dense"
            + (", use shape_rule=most_params" if rule else "") + " or use kind lowrank / tucker")
    least = min(allowed, key=lambda f: (f.params, f.a_shape))
    smallest = build((least.a_shape,) * rank)  # refusals here are not about the budget

    for f in allowed:
        if budget.param_ratio is not None and f.param_ratio > budget.param_ratio * (1 + 1e-12):
            continue
        if budget.mac_ratio is not None and f.mac_ratio is not None \
                and f.mac_ratio > budget.mac_ratio * (1 + 1e-12):
            continue
        m = try_build(build, (f.a_shape,) * rank)
        if m is not None and budget.meets(m):
            return (f.a_shape,) * rank
    near = f"{budget.achievable(smallest)} (A {least.a_shape})"
    mac_best = min((f for f in allowed if f.mac_ratio is not None),
                   key=lambda f: (f.mac_ratio, f.params, f.a_shape), default=None)
    if budget.mac_ratio is not None and mac_best is not None:
        near += f"; smallest mac_ratio {mac_best.mac_ratio:.4g} (A {mac_best.a_shape})"
    raise FactorizationError(f"{label}: no rank-{rank} Kronecker term meets "
                             f"{budget.describe()} (blocker: budget); smallest achievable {near}")


# ------------------------------------------------------------------------------- register

register_layer_kind("kron", linear=KronLinear, conv=KronConv2d, knob="terms",
                    setting=_kron_setting, search=_kron_search, fit=_kron_fit,
                    implementation=True)
register_layer_kind("lowrank", linear=LowRankLinear)
register_layer_kind("separable", conv=SeparableConv2d)
register_layer_kind("cp", conv=CPConv2d)
register_layer_kind("tucker", conv=TuckerConv2d, knob="ranks", setting=_tucker_setting,
                    search=_tucker_search)
