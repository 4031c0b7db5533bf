"""Multiply-accumulate formulas of the layers: the dense ones and each factored shape group.

The one home of these closed forms (docs/design.md, D5): the layers' own
``analytic_macs``, their cost model, :mod:`kron.layers.shapes` and :mod:`kron.measure` call
them. They count exactly the matmuls and convolutions the forwards run (bias adds and
elementwise ops not counted), so that tests can hold them equal to ``FlopCounterMode``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Shape = tuple[int, ...]


def linear_macs(input_shape: Sequence[int], in_features: int, out_features: int) -> int:
    """MACs of a dense ``(..., in_features) -> (..., out_features)`` matmul (bias not counted)."""
    return math.prod([int(s) for s in input_shape[:-1]]) * int(in_features) * int(out_features)


def conv_out_size(size: int, kernel: int, stride: int, pad_total: int, dilation: int) -> int:
    """One spatial output size of a convolution (``nn.Conv2d``'s formula; ``pad_total`` is
    both sides together, so asymmetric padding is exact)."""
    return (int(size) + pad_total - dilation * (kernel - 1) - 1) // stride + 1


def conv2d_macs(
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int] | str,
    dilation: Sequence[int],
) -> int:
    """MACs of a dense 2-D convolution of an ``(N, C, H, W)`` (or unbatched ``(C, H, W)``)
    input with a weight of ``(out, in / groups, kh, kw)`` (bias not counted): every output
    pixel of every output channel costs one MAC per weight of its filter. ``padding`` is a
    pair (per side), ``'same'`` or ``'valid'``."""
    n = int(input_shape[0]) if len(input_shape) == 4 else 1
    h, w = (int(s) for s in input_shape[-2:])
    if padding == "same":
        ho, wo = h, w
    else:
        ph, pw = (0, 0) if padding == "valid" else (int(p) for p in padding)
        (kh, kw), (sh, sw), (dh, dw) = weight_shape[2:], stride, dilation
        ho = conv_out_size(h, int(kh), int(sh), 2 * ph, int(dh))
        wo = conv_out_size(w, int(kw), int(sw), 2 * pw, int(dw))
    return n * math.prod([int(s) for s in weight_shape]) * ho * wo


# ----------------------------------------------------------------------------- linear terms


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


# ------------------------------------------------------------------------------- conv terms


def is_pointwise(a_shape: Shape) -> bool:
    """Whether a conv term's A is 1x1 in space (a channel mixer)."""
    return a_shape[2] == 1 and a_shape[3] == 1


def a_first(a_shape: Shape, b_shape: Shape, stride: Sequence[int]) -> bool:
    """Whether a pointwise-A group mixes channels with A before B's convolution (a matmul
    that can write into a reused buffer, then one conv that produces the output) rather than
    after it. Decided from the shapes alone (per output pixel at stride 1, ties to A first),
    so that every mode, device and tracer runs and counts the same ops."""
    if not is_pointwise(a_shape) or tuple(stride) != (1, 1):
        return False
    f1, c1 = a_shape[:2]
    f2, c2, kh, kw = b_shape
    k = kh * kw
    return c2 * f1 * (c1 + f2 * k) <= f2 * c1 * (c2 * k + f1)


def conv_group_macs(
    a_shape: Shape,
    b_shape: Shape,
    rank: int,
    input_shape: Sequence[int],
    *,
    stride: Sequence[int],
    pads: Sequence[int],
    dilation: Sequence[int],
    blocks: int = 1,
) -> int:
    """MACs of one shape group of the factored conv on ``(N, C, H, W)`` or ``(C, H, W)``:
    ``blocks`` (the conv's ``groups``) independent block convs, ``pads`` is
    ``(left, right, top, bottom)``; the stages are those :mod:`kron.layers.kron_functional`
    runs."""
    n = int(input_shape[0]) if len(input_shape) == 4 else 1
    h, w = (int(s) for s in input_shape[-2:])
    f1, c1, kh1, kw1 = a_shape
    f2, c2, kh2, kw2 = b_shape
    (sh, sw), (dh, dw) = stride, dilation
    hp, wp = h + pads[2] + pads[3], w + pads[0] + pads[1]
    per = n * blocks * rank
    if is_pointwise(a_shape):
        ho, wo = conv_out_size(hp, kh2, sh, 0, dh), conv_out_size(wp, kw2, sw, 0, dw)
        conv = per * f2 * c2 * kh2 * kw2 * ho * wo
        if a_first(a_shape, b_shape, stride):
            return per * f1 * c1 * c2 * h * w + f1 * conv
        return c1 * conv + per * f1 * c1 * f2 * ho * wo
    h1, w1 = conv_out_size(hp, kh2, 1, 0, dh), conv_out_size(wp, kw2, 1, 0, dw)
    ho, wo = conv_out_size(h1, kh1, sh, 0, dh * kh2), conv_out_size(w1, kw1, sw, 0, dw * kw2)
    return per * (c1 * f2 * c2 * kh2 * kw2 * h1 * w1 + f2 * f1 * c1 * kh1 * kw1 * ho * wo)
