"""Kronecker term shapes: validation, enumeration, and their analytic cost.

A term is named by its A shape; B's shape follows from the layer (docs/design.md, section 1). These
helpers say which A shapes fit a layer, what each costs (parameters and multiply-accumulates of
exactly the ops the layers run, :mod:`kron.layers.macs`), and pick terms for a parameter or
MAC budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from kron.layers.conv_args import ConvArgs
from kron.layers.errors import FactorizationError
from kron.layers.macs import conv_group_macs, linear_group_macs, linear_macs

Shape = tuple[int, ...]


def divisors(n: int) -> list[int]:
    """All positive divisors of ``n`` in increasing order."""
    small = [d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def all_a_shapes(dims: Sequence[int]) -> list[Shape]:
    """Every A shape whose axes divide the layer's axes (``dims`` = the dense weight's shape)."""
    shapes: list[Shape] = [()]
    for d in dims:
        shapes = [s + (k,) for s in shapes for k in divisors(int(d))]
    return shapes


def _nearest(dims: Sequence[int], bad: Sequence[int], count: int = 3) -> list[Shape]:
    """The valid A shapes closest to ``bad`` in log scale (what the user probably meant)."""

    def distance(shape: Shape) -> float:
        return sum(abs(math.log(a) - math.log(max(b, 1))) for a, b in zip(shape, bad))

    return sorted(all_a_shapes(dims), key=distance)[:count]


def normalize_terms(layer: str, dims: Sequence[int], terms: Sequence[Sequence[int]]) -> list[Shape]:
    """Check every A shape in ``terms`` against the dense weight shape ``dims``.

    Raises a one-line ``FactorizationError`` naming the layer's dimensions, the bad shape and
    the nearest valid shapes.
    """
    dims = tuple(int(d) for d in dims)
    if isinstance(terms, (str, bytes)) or len(terms) == 0:
        raise FactorizationError(
            f"{layer}{dims}: terms must be a non-empty list of A shapes, got {terms!r}"
        )
    out: list[Shape] = []
    for term in terms:
        try:
            shape = tuple(int(s) for s in term)
        except (TypeError, ValueError):
            raise FactorizationError(
                f"{layer}{dims}: each term must be a tuple of {len(dims)} ints, got {term!r}"
            ) from None
        ok = len(shape) == len(dims) and all(
            a >= 1 and d % a == 0 for a, d in zip(shape, dims)
        )
        if not ok:
            if len(shape) != len(dims):
                hint = f"an A shape has {len(dims)} axes"
            else:
                near = ", ".join(str(s) for s in _nearest(dims, shape))
                hint = f"each axis of A must divide the layer's; nearest valid: {near}"
            raise FactorizationError(
                f"{layer}{dims}: invalid Kronecker term A shape {term!r} ({hint})")
        out.append(shape)
    return out


def group_terms(terms: Sequence[Shape]) -> list[tuple[Shape, int]]:
    """Group repeated shapes: ``[(a_shape, rank), ...]`` in first-appearance order."""
    counts: dict[Shape, int] = {}
    for t in terms:
        counts[t] = counts.get(t, 0) + 1
    return list(counts.items())


# ------------------------------------------------------------------------ enumeration / choice


@dataclass(frozen=True)
class Factorization:
    """One candidate single-shape Kronecker replacement of a layer, with its cost."""

    a_shape: Shape
    b_shape: Shape
    rank: int
    params: int
    macs: int | None
    param_ratio: float
    mac_ratio: float | None


def _conv_args(layer: nn.Module) -> ConvArgs:
    """The conv arguments of an ``nn.Conv2d`` or of a factored conv layer."""
    if isinstance(layer, nn.Conv2d):
        return ConvArgs.from_conv(layer)
    args = getattr(layer, "args", None)
    if isinstance(args, ConvArgs):
        return args
    return ConvArgs.of(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                       layer.padding, layer.dilation, getattr(layer, "groups", 1),
                       getattr(layer, "padding_mode", "zeros"))


def _layer_dims(layer: nn.Module) -> tuple[Shape, ConvArgs | None]:
    """``(one block's kernel shape, conv arguments or None for a linear layer)``; a grouped
    conv's block is ``(F/groups, C/groups, kh, kw)``."""
    if isinstance(layer, nn.Linear) or (
            not isinstance(layer, nn.Conv2d) and hasattr(layer, "in_features")):
        return (int(layer.out_features), int(layer.in_features)), None
    if isinstance(layer, nn.Conv2d) or hasattr(layer, "kernel_size"):
        args = _conv_args(layer)
        return (args.out_channels // args.groups, *args.weight_shape[1:]), args
    raise FactorizationError(f"expected nn.Linear or nn.Conv2d, got {type(layer).__name__}; "
                             "only linear and 2-D conv layers have Kronecker terms")


def kron_term_shapes(layer: nn.Module) -> list[Shape]:
    """All valid A shapes of a Kronecker term for ``layer`` (nn.Linear or nn.Conv2d)."""
    dims, _ = _layer_dims(layer)
    return all_a_shapes(dims)


def factorizations(
    layer: nn.Module,
    input_hw: Sequence[int] | None = None,
    rank: int = 1,
    include_trivial: bool = False,
) -> list[Factorization]:
    """Every single-shape, rank-``rank`` Kronecker replacement of ``layer`` with its cost.

    Parameters and MACs (per input sample; conv MACs need ``input_hw``) are those of the
    factored execution. ``include_trivial`` keeps the two shapes that reproduce the dense layer
    (A all ones, or B all ones). Sorted by parameter count.
    """
    dims, args = _layer_dims(layer)
    blocks = 1 if args is None else args.groups
    dense_params = blocks * math.prod(dims)
    shape = None if args is None or input_hw is None else (1, args.in_channels, *input_hw)
    if args is None:
        dense_macs: int | None = linear_macs((1, dims[1]), dims[1], dims[0])
    else:
        dense_macs = None if shape is None else args.dense_macs(shape)
    out = []
    for a in all_a_shapes(dims):
        b = tuple(d // s for d, s in zip(dims, a))
        if not include_trivial and (math.prod(a) == 1 or math.prod(b) == 1):
            continue
        if rank > min(math.prod(a), math.prod(b)):
            continue
        params = blocks * rank * (math.prod(a) + math.prod(b))
        if args is None:
            macs: int | None = linear_group_macs(a, b, rank, 1)
        elif shape is not None:
            macs = conv_group_macs(a, b, rank, shape, stride=args.stride, pads=args.pads,
                                   dilation=args.dilation, blocks=blocks)
        else:
            macs = None
        out.append(
            Factorization(
                a, b, rank, params, macs, params / dense_params,
                None if macs is None or dense_macs is None else macs / dense_macs,
            )
        )
    return sorted(out, key=lambda f: (f.params, f.a_shape))


def within_budget(
    layer: nn.Module,
    input_hw: Sequence[int] | None = None,
    *,
    rank: int = 1,
    param_ratio: float | None = None,
    mac_ratio: float | None = None,
    include_trivial: bool = False,
) -> list[Factorization]:
    """The single-shape rank-``rank`` Kronecker replacements of ``layer`` within budget: the
    one budget filter (used by :func:`choose_terms` and by ``kron-tables sweep``).

    A shape is kept when its parameter ratio is ``<= param_ratio`` and its MAC ratio ``<=
    mac_ratio`` (each bound only when given; conv MACs need ``input_hw``). Sorted by parameters.
    """
    if param_ratio is None and mac_ratio is None:
        raise FactorizationError(
            "a Kronecker shape choice needs a budget: param_ratio and/or mac_ratio")
    for name, v in (("param_ratio", param_ratio), ("mac_ratio", mac_ratio)):
        if v is not None and not v > 0:
            raise FactorizationError(f"{name} must be > 0, got {v}")
    if mac_ratio is not None and input_hw is None and not isinstance(layer, nn.Linear):
        raise FactorizationError(
            "a MAC budget on a conv layer needs its input size (input_hw=(H, W))")
    return [f for f in factorizations(layer, input_hw=input_hw, rank=rank,
                                      include_trivial=include_trivial)
            if (param_ratio is None or f.param_ratio <= param_ratio)
            and (mac_ratio is None or (f.mac_ratio is not None and f.mac_ratio <= mac_ratio))]


#: how a budget picks a Kronecker shape (docs/design.md, D11). ``most_params``: any
#: non-trivial shape, the most parameters within budget, ties to the most balanced A/B split.
#: ``square_channels``: only shapes whose A keeps the kernel whole in B (A's spatial axes 1)
#: and splits the channels both ways (A and B each at least 2 x 2 channels); the most
#: parameters within budget, ties to the squarest channel blocks, then the fewest MACs (the
#: structure of the hand-picked ``A 16x16x1x1`` rows, which train best in docs/results.md).
SHAPE_RULES = ("most_params", "square_channels")


def check_shape_rule(rule: str, label: str = "kron") -> str:
    """``rule`` if it is one of :data:`SHAPE_RULES`, else a one-line ``FactorizationError``."""
    if rule not in SHAPE_RULES:
        raise FactorizationError(f"{label}: shape_rule must be one of {list(SHAPE_RULES)}, "
                                 f"got {rule!r}")
    return rule


def _square_channels(f: Factorization) -> bool:
    a, b = f.a_shape, f.b_shape
    return all(s == 1 for s in a[2:]) and min(a[0], a[1], b[0], b[1]) >= 2


def preferred(cands: Sequence[Factorization], rule: str = "most_params"
              ) -> list[Factorization]:
    """The candidates ``rule`` allows, best first (see :data:`SHAPE_RULES`); the caller
    takes the first that fits its budget."""
    check_shape_rule(rule)

    def balance(f: Factorization) -> float:
        return abs(math.log(math.prod(f.a_shape)) - math.log(math.prod(f.b_shape)))

    if rule == "most_params":
        return sorted(cands, key=lambda f: (-f.params, balance(f), f.a_shape))
    return sorted((f for f in cands if _square_channels(f)),
                  key=lambda f: (-f.params, _channel_aspect(f), f.macs if f.macs is not None
                                 else 0, f.a_shape))


def _channel_aspect(f: Factorization) -> float:
    """How far A's and B's channel blocks are from square (0: both square)."""
    return sum(abs(math.log(s[0] / s[1])) for s in (f.a_shape, f.b_shape))


def choose_terms(
    layer: nn.Module,
    *,
    param_ratio: float | None = None,
    mac_ratio: float | None = None,
    input_hw: Sequence[int] | None = None,
    rank: int = 1,
    shape_rule: str = "most_params",
) -> list[Shape]:
    """The single-shape ``terms`` list (``rank`` copies of one A shape) for a budget.

    Among the shapes :func:`within_budget`, ``shape_rule`` picks (:data:`SHAPE_RULES`; the
    default takes the one with the most parameters, ties to the most balanced A/B split).
    Raises ``FactorizationError`` if nothing fits, naming the blocker and the smallest
    achievable ratio.
    """
    check_shape_rule(shape_rule, type(layer).__name__)
    fits = preferred(within_budget(layer, input_hw, rank=rank, param_ratio=param_ratio,
                                   mac_ratio=mac_ratio), shape_rule)
    if not fits:
        cands = preferred(factorizations(layer, input_hw=input_hw, rank=rank), shape_rule)
        name = type(layer).__name__
        if not cands:
            dims, args = _layer_dims(layer)
            blocker = (f"groups={args.groups} leaves blocks of {dims}"
                       if args is not None and args.groups > 1 else f"its shape {dims}")
            rule = "" if shape_rule == "most_params" else f" allowed by shape_rule={shape_rule}"
            raise FactorizationError(
                f"{name}: {blocker} has no non-trivial rank-{rank} Kronecker term{rule}; "
                f"nearest working setting: rank=1"
                + (", shape_rule=most_params" if rule else "") + " or leave this layer dense")
        best_p = min((f.param_ratio for f in cands), default=float("nan"))
        best_m = min((f.mac_ratio for f in cands if f.mac_ratio is not None), default=None)
        raise FactorizationError(
            f"{name}: no rank-{rank} Kronecker term meets param_ratio={param_ratio}, "
            f"mac_ratio={mac_ratio}; smallest achievable: param_ratio={best_p:.4g}"
            + (f", mac_ratio={best_m:.4g}" if best_m is not None else "")
        )
    return [fits[0].a_shape] * rank
