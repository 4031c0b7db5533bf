"""Small helpers shared by every factored layer: argument normalisation, conv geometry, init,
and the checks that a dense source layer can be factored."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def pair(value: int | Sequence[int], name: str = "value") -> tuple[int, int]:
    """Normalise an int or a 2-sequence to a pair of ints, as ``nn.Conv2d`` does."""
    if isinstance(value, int):
        return (value, value)
    items = tuple(int(v) for v in value)
    if len(items) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return items  # type: ignore[return-value]


def kaiming_std(fan_in: int) -> float:
    """Std of the composed weight that ``nn.Linear``/``nn.Conv2d`` default init gives.

    PyTorch's default is ``kaiming_uniform_(a=sqrt(5))``: uniform on ``[-1/sqrt(fan_in),
    1/sqrt(fan_in)]``, whose variance is ``1 / (3 * fan_in)``. Factored layers scale their
    factors so that the composed weight keeps this variance (docs/design.md, section 1).
    """
    return 1.0 / math.sqrt(3.0 * fan_in)


def init_bias_(bias: torch.Tensor | None, fan_in: int) -> None:
    """PyTorch's default bias init: uniform on ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``."""
    if bias is not None:
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        torch.nn.init.uniform_(bias, -bound, bound)


def factor_std(target_std: float, n_factors: int, n_terms: int) -> float:
    """Std of each of ``n_factors`` independent zero-mean factors of a product, summed over
    ``n_terms`` terms, so that the sum has std ``target_std``.

    ``Var(prod_j F_j) = prod_j Var(F_j)`` for independent zero-mean factors, so each factor gets
    ``(target_var / n_terms) ** (1 / n_factors)``.
    """
    var = target_std**2 / max(n_terms, 1)
    return var ** (0.5 / n_factors)


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
    kernel_size, stride, padding, dilation = conv_geometry(
        conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    return dict(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        bias=conv.bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )


def conv_geometry(
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int],
    padding: str | int | Sequence[int],
    dilation: int | Sequence[int],
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]:
    """``nn.Conv2d``-style arguments as int pairs ``(kernel_size, stride, padding, dilation)``,
    the padding resolved by :func:`resolve_padding`."""
    k, st, d = pair(kernel_size, "kernel_size"), pair(stride, "stride"), pair(dilation, "dilation")
    return k, st, resolve_padding(padding, k, st, d), d
