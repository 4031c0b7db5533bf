"""Argument checks shared by the low-rank baselines: rank ranges, conv padding, source layers."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import nn

from kron.layers.common import pair


def check_rank(layer: str, dims: str, name: str, rank: int, max_rank: int) -> int:
    """Return ``rank`` if it lies in ``1..max_rank``; else a one-line ``ValueError``."""
    try:
        value = None if isinstance(rank, bool) else operator.index(rank)
    except TypeError:
        value = None
    if value is None or not 1 <= value <= max_rank:
        raise ValueError(
            f"{layer}({dims}): {name}={rank!r} is out of range; valid {name}s are 1..{max_rank}"
        )
    return value


def resolve_padding(
    padding: str | int | Sequence[int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int]:
    """Padding as an int pair; ``'valid'`` is 0, ``'same'`` the symmetric half of ``d*(k-1)``.

    ``nn.Conv2d`` pads asymmetrically when ``d*(k-1)`` is odd; the staged convolutions here pad
    each stage symmetrically, so that case (and ``'same'`` with a stride, which PyTorch rejects
    too) is a ``ValueError``.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding != "same":
            raise ValueError(f"padding must be 'valid', 'same', an int or a pair, got {padding!r}")
        if stride != (1, 1):
            raise ValueError(f"padding='same' needs stride 1, got stride={stride}")
        totals = [d * (k - 1) for k, d in zip(kernel_size, dilation, strict=True)]
        if any(t % 2 for t in totals):
            raise ValueError(
                f"padding='same' with kernel_size={kernel_size}, dilation={dilation} needs "
                f"asymmetric padding {totals}, which factored layers do not support"
            )
        return (totals[0] // 2, totals[1] // 2)
    pad = pair(padding, "padding")
    if min(pad) < 0:
        raise ValueError(f"padding must be non-negative, got {pad}")
    return pad


def check_source_conv(conv: nn.Conv2d) -> None:
    """Reject dense convs that the factored layers cannot reproduce (groups, padding modes)."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"expected an nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(f"only groups=1 convolutions can be factored, got groups={conv.groups}")
    if conv.padding_mode != "zeros":
        raise ValueError(
            f"only padding_mode='zeros' can be factored, got padding_mode={conv.padding_mode!r}"
        )


def conv_kwargs(conv: nn.Conv2d) -> dict:
    """Constructor keyword arguments that copy a dense conv's geometry, bias flag and placement."""
    check_source_conv(conv)
    kernel_size = pair(conv.kernel_size)
    stride, dilation = pair(conv.stride), pair(conv.dilation)
    return dict(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=kernel_size,
        stride=stride,
        padding=resolve_padding(conv.padding, kernel_size, stride, dilation),
        dilation=dilation,
        bias=conv.bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )


def conv_input_dims(
    layer: str, in_channels: int, input_shape: Sequence[int]
) -> tuple[int, int, int]:
    """``(batch, H, W)`` of a conv input shape ``(N, C, H, W)`` or unbatched ``(C, H, W)``."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) not in (3, 4) or shape[-3] != in_channels:
        raise ValueError(
            f"{layer} expects an input shape (N, {in_channels}, H, W) or ({in_channels}, H, W), "
            f"got {shape}"
        )
    batch = shape[0] if len(shape) == 4 else 1
    return batch, shape[-2], shape[-1]


def linear_batch(layer: str, in_features: int, input_shape: Sequence[int]) -> int:
    """Number of rows a linear layer sees for an input shape ``(*, in_features)``."""
    shape = tuple(int(s) for s in input_shape)
    if not shape or shape[-1] != in_features:
        raise ValueError(f"{layer} expects an input shape (*, {in_features}), got {shape}")
    return math.prod(shape[:-1])


def svd64(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float64 (on the matrix's device), so that fits are exact to float64."""
    return torch.linalg.svd(matrix.detach().to(torch.float64), full_matrices=False)
