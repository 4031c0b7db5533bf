"""Kronecker term shapes: validation, enumeration, and their analytic cost.

A term is named by its A shape; B's shape follows from the layer (docs/design.md, section 1). These
helpers say which A shapes fit a layer, what each costs (parameters and multiply-accumulates of
exactly the ops :mod:`kron.layers.kronecker` runs), and pick terms for a parameter or MAC budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from kron.layers.common import conv_output_size, pair
from kron.measure import conv2d_macs, linear_macs

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

    Raises a one-line ``ValueError`` naming the layer's dimensions, the bad shape and the nearest
    valid shapes.
    """
    dims = tuple(int(d) for d in dims)
    if isinstance(terms, (str, bytes)) or len(terms) == 0:
        raise ValueError(
            f"{layer}{dims}: terms must be a non-empty list of A shapes, got {terms!r}"
        )
    out: list[Shape] = []
    for term in terms:
        try:
            shape = tuple(int(s) for s in term)
        except (TypeError, ValueError):
            raise ValueError(
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
            raise ValueError(f"{layer}{dims}: invalid Kronecker term A shape {term!r} ({hint})")
        out.append(shape)
    return out


def group_terms(terms: Sequence[Shape]) -> list[tuple[Shape, int]]:
    """Group repeated shapes: ``[(a_shape, rank), ...]`` in first-appearance order."""
    counts: dict[Shape, int] = {}
    for t in terms:
        counts[t] = counts.get(t, 0) + 1
    return list(counts.items())


# ----------------------------------------------------------------------------- linear costs


def linear_order(a_shape: Shape, b_shape: Shape) -> str:
    """Which factor the factored linear applies first: the cheaper contraction order."""
    (m1, n1), (m2, n2) = a_shape, b_shape
    b_first = n1 * n2 * m2 + m1 * n1 * m2
    a_first = m1 * n1 * n2 + m1 * n2 * m2
    return "a" if a_first < b_first else "b"


def linear_group_macs(a_shape: Shape, b_shape: Shape, rank: int, rows: int) -> int:
    """MACs of one shape group of the factored linear on ``rows`` input vectors."""
    (m1, n1), (m2, n2) = a_shape, b_shape
    if linear_order(a_shape, b_shape) == "b":
        return rows * rank * (n1 * n2 * m2 + m1 * n1 * m2)
    return rows * rank * (m1 * n1 * n2 + m1 * n2 * m2)


# ------------------------------------------------------------------------------- conv costs


@dataclass(frozen=True)
class ConvGeometry:
    """What a conv layer's factored execution depends on, besides its term shapes."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    def stage_plan(self, a_shape: Shape) -> tuple[tuple[int, int], bool]:
        """``(stage-1 stride, pointwise A?)``: a 1x1 A mixes channels only, so the layer's
        stride moves into the B convolution and A runs as one batched matmul."""
        pointwise = is_pointwise(a_shape)
        return (self.stride if pointwise else (1, 1)), pointwise


def is_pointwise(a_shape: Shape) -> bool:
    """Whether a conv term's A is 1x1 in space (a channel mixer)."""
    return a_shape[2] == 1 and a_shape[3] == 1


def conv_group_macs(
    geom: ConvGeometry, a_shape: Shape, b_shape: Shape, rank: int, input_shape: Sequence[int]
) -> int:
    """MACs of one shape group of the factored conv on an ``(N, C, H, W)`` input."""
    n, _, h, w = (int(s) for s in input_shape)
    f1, c1, kh1, kw1 = a_shape
    f2, c2, kh2, kw2 = b_shape
    stride1, pointwise = geom.stage_plan(a_shape)
    padded = (h + 2 * geom.padding[0], w + 2 * geom.padding[1])
    h1, w1 = conv_output_size(padded, (kh2, kw2), stride1, (0, 0), geom.dilation)
    stage1 = n * c1 * rank * f2 * c2 * kh2 * kw2 * h1 * w1
    if pointwise:
        return stage1 + n * f1 * c1 * rank * f2 * h1 * w1
    dil2 = (geom.dilation[0] * kh2, geom.dilation[1] * kw2)
    ho, wo = conv_output_size((h1, w1), (kh1, kw1), geom.stride, (0, 0), dil2)
    return stage1 + n * f2 * f1 * c1 * rank * kh1 * kw1 * ho * wo


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


def _layer_dims(layer: nn.Module) -> tuple[Shape, ConvGeometry | None]:
    if isinstance(layer, nn.Linear):
        return (layer.out_features, layer.in_features), None
    if isinstance(layer, nn.Conv2d):
        if isinstance(layer.padding, str):
            raise ValueError(f"{layer}: string padding {layer.padding!r} is not supported")
        geom = ConvGeometry(pair(layer.stride), pair(layer.padding), pair(layer.dilation))
        return tuple(layer.weight.shape), geom
    weight = getattr(layer, "dense_weight", None)
    if weight is not None:
        geom = None
        if hasattr(layer, "stride"):
            geom = ConvGeometry(pair(layer.stride), pair(layer.padding), pair(layer.dilation))
        return tuple(layer.dense_weight().shape), geom
    raise TypeError(f"expected nn.Linear or nn.Conv2d, got {type(layer).__name__}")


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
    dims, geom = _layer_dims(layer)
    dense_params = math.prod(dims)
    if geom is None:
        dense_macs: int | None = linear_macs((1, dims[1]), dims[1], dims[0])
    elif input_hw is not None:
        dense_macs = conv2d_macs((1, dims[1], *input_hw), dims, geom.stride, geom.padding,
                                 geom.dilation)
    else:
        dense_macs = None
    out = []
    for a in all_a_shapes(dims):
        b = tuple(d // s for d, s in zip(dims, a))
        if not include_trivial and (math.prod(a) == 1 or math.prod(b) == 1):
            continue
        if rank > min(math.prod(a), math.prod(b)):
            continue
        params = rank * (math.prod(a) + math.prod(b))
        if geom is None:
            macs: int | None = linear_group_macs(a, b, rank, 1)
        elif input_hw is not None:
            macs = conv_group_macs(geom, a, b, rank, (1, dims[1], *input_hw))
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
        raise ValueError("a Kronecker shape choice needs a budget: param_ratio and/or mac_ratio")
    for name, v in (("param_ratio", param_ratio), ("mac_ratio", mac_ratio)):
        if v is not None and not v > 0:
            raise ValueError(f"{name} must be > 0, got {v}")
    if mac_ratio is not None and input_hw is None and not isinstance(layer, nn.Linear):
        raise ValueError("a MAC budget on a conv layer needs its input size (input_hw=(H, W))")
    return [f for f in factorizations(layer, input_hw=input_hw, rank=rank,
                                      include_trivial=include_trivial)
            if (param_ratio is None or f.param_ratio <= param_ratio)
            and (mac_ratio is None or (f.mac_ratio is not None and f.mac_ratio <= mac_ratio))]


def choose_terms(
    layer: nn.Module,
    *,
    param_ratio: float | None = None,
    mac_ratio: float | None = None,
    input_hw: Sequence[int] | None = None,
    rank: int = 1,
) -> list[Shape]:
    """The single-shape ``terms`` list (``rank`` copies of one A shape) for a budget.

    Among the shapes :func:`within_budget`, the one with the most parameters wins (most
    capacity for the budget); ties go to the most balanced A/B split. Raises ``ValueError`` if
    nothing fits, naming the smallest achievable ratio.
    """
    fits = within_budget(layer, input_hw, rank=rank, param_ratio=param_ratio,
                         mac_ratio=mac_ratio)
    if not fits:
        cands = factorizations(layer, input_hw=input_hw, rank=rank)
        best_p = min((f.param_ratio for f in cands), default=float("nan"))
        best_m = min((f.mac_ratio for f in cands if f.mac_ratio is not None), default=None)
        raise ValueError(
            f"no rank-{rank} Kronecker term of {layer} meets param_ratio={param_ratio}, "
            f"mac_ratio={mac_ratio}; smallest achievable: param_ratio={best_p:.4g}"
            + (f", mac_ratio={best_m:.4g}" if best_m is not None else "")
        )

    def balance(f: Factorization) -> float:
        return abs(math.log(math.prod(f.a_shape)) - math.log(math.prod(f.b_shape)))

    best = max(fits, key=lambda f: (f.params, -balance(f)))
    return [best.a_shape] * rank
