"""Small helpers shared by every factored layer: argument normalisation, conv geometry, init."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def pair(value: int | Sequence[int], name: str = "value") -> tuple[int, int]:
    """Normalise an int or a 2-sequence to a pair of ints, as ``nn.Conv2d`` does."""
    if isinstance(value, int):
        return (value, value)
    items = tuple(int(v) for v in value)
    if len(items) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return items  # type: ignore[return-value]


def conv_output_size(
    size: tuple[int, int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int]:
    """Spatial output size of a 2-D convolution (the formula in ``nn.Conv2d``'s docs)."""
    return tuple(  # type: ignore[return-value]
        (s + 2 * p - d * (k - 1) - 1) // st + 1
        for s, k, st, p, d in zip(size, kernel_size, stride, padding, dilation)
    )


def kaiming_std(fan_in: int) -> float:
    """Std of the composed weight that ``nn.Linear``/``nn.Conv2d`` default init gives.

    PyTorch's default is ``kaiming_uniform_(a=sqrt(5))``: uniform on ``[-1/sqrt(fan_in),
    1/sqrt(fan_in)]``, whose variance is ``1 / (3 * fan_in)``. Factored layers scale their
    factors so that the composed weight keeps this variance (DESIGN.md section 3).
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
