"""Kronecker convolution with a pointwise A as one grouped conv and one 1x1 conv
(docs/notes/gpu_kernels.md).

For a shape group whose A factors are 1x1 in space, ``W = sum_r kron(A_r, B_r)`` with
``A_r (F1, C1, 1, 1)`` and ``B_r (F2, C2, kh, kw)`` gives, for input channel block ``c1`` (the
``C2`` channels ``c1*C2 .. c1*C2+C2-1``) and output channel ``f1*F2 + f2``:

    y[f1*F2 + f2] = sum_{c1, r} A_r[f1, c1] * (B_r[f2] conv x[block c1])

Stage 1 is every ``B_r`` applied to every block: one grouped ``kh x kw`` conv with
``groups = C1`` whose weight stacks the R B's once per block, output channels ordered
``(c1, r, f2)``. Stage 2 mixes ``(c1, r, f2) -> (f1, f2)``: a 1x1 conv whose weight is
``kron(A', I_F2)`` with ``A'[f1, (c1, r)] = A_r[f1, c1]``, so the sum over terms rides inside the
1x1 contraction. The layer's stride, padding and dilation all belong to stage 1 (A has no spatial
extent). Both stages are plain cuDNN / oneDNN convolutions that keep the input's memory format
(channels_last stays channels_last, which is where cuDNN's grouped and 1x1 kernels are fast).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

_IntPair = int | Sequence[int]


def grouped_weight(b: torch.Tensor, in_blocks: int) -> torch.Tensor:
    """Stage-1 weight ``(C1*R*F2, C2, kh, kw)``: the R B's stacked, repeated for each of the
    ``in_blocks = C1`` groups (output channel ``(c1, r, f2)`` holds ``B_r[f2]``)."""
    rank, f2, c2, kh, kw = b.shape
    return b.reshape(rank * f2, c2, kh, kw).repeat(in_blocks, 1, 1, 1)


def mixing_weight(a: torch.Tensor, f2: int) -> torch.Tensor:
    """Stage-2 1x1 weight ``(F1*F2, C1*R*F2, 1, 1)`` equal to ``kron(A', I_F2)`` with
    ``A'[f1, (c1, r)] = A_r[f1, c1, 0, 0]``: entry ``[(f1, g), (c1, r, f)]`` is
    ``A_r[f1, c1] * [g == f]``."""
    rank, f1, c1 = a.shape[:3]
    # contiguous: torch.kron fails on some permuted views (size-1 dims).
    a2 = a.reshape(rank, f1, c1).permute(1, 2, 0).reshape(f1, c1 * rank).contiguous()
    eye = torch.eye(f2, device=a.device, dtype=a.dtype)
    return torch.kron(a2, eye).reshape(f1 * f2, c1 * rank * f2, 1, 1)


def _check(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 5 or b.dim() != 5 or a.shape[0] != b.shape[0] or a.shape[3:] != (1, 1):
        raise ValueError(
            "pointwise_kron_conv expects a (R, F1, C1, 1, 1) and b (R, F2, C2, kh, kw); got "
            f"{tuple(a.shape)}, {tuple(b.shape)}"
        )
    if x.dim() != 4 or x.shape[1] != a.shape[2] * b.shape[2]:
        raise ValueError(
            f"pointwise_kron_conv expects x (N, {a.shape[2] * b.shape[2]}, H, W) "
            f"(C1*C2 channels), got {tuple(x.shape)}"
        )
    if not torch.is_autocast_enabled(x.device.type) and not (x.dtype == a.dtype == b.dtype):
        raise ValueError(
            f"pointwise_kron_conv: dtypes differ (x {x.dtype}, a {a.dtype}, b {b.dtype}); "
            "cast them to one dtype or run under autocast"
        )


def pointwise_kron_conv(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    stride: _IntPair = 1,
    padding: _IntPair | str = 0,
    dilation: _IntPair = 1,
) -> torch.Tensor:
    """``F.conv2d(x, sum_r kron(a[r], b[r]), stride=, padding=, dilation=)`` for pointwise A,
    as a grouped conv followed by a 1x1 mixing conv (no bias; differentiable in all three).

    ``x (N, C1*C2, H, W)``, ``a (R, F1, C1, 1, 1)``, ``b (R, F2, C2, kh, kw)`` ->
    ``(N, F1*F2, Ho, Wo)`` in ``x``'s memory format; under autocast in the autocast dtype."""
    _check(x, a, b)
    c1, f2 = a.shape[2], b.shape[1]
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    w1 = grouped_weight(b, c1).contiguous(memory_format=fmt)
    w2 = mixing_weight(a, f2).contiguous(memory_format=fmt)
    z = F.conv2d(x, w1, None, stride, padding, dilation, groups=c1)
    y = F.conv2d(z, w2)
    return y.contiguous(memory_format=fmt)
