"""Argument checks shared by the low-rank baselines: rank ranges, input shapes, float64 SVD."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch

from kron.layers.errors import FactorizationError


def check_rank(layer: str, dims: str, name: str, rank: object, max_rank: int,
               groups: int = 1) -> int:
    """``rank`` as an int if it lies in ``1..max_rank``; else a one-line
    :class:`~kron.layers.errors.FactorizationError` naming the layer, the nearest rank that
    works and the range (per group when ``groups > 1``), last, so that callers can quote it."""
    try:
        value = None if isinstance(rank, bool) else operator.index(rank)
    except TypeError:
        value = None
    if value is not None and 1 <= value <= max_rank:
        return value
    nearest = f"; nearest that works: {name}={min(max(value, 1), max_rank)}" \
        if value is not None else ""
    scope = f" per group (groups={groups})" if groups > 1 else ""
    raise FactorizationError(f"{layer}({dims}): {name}={rank!r} is out of range{nearest}; "
                             f"valid {name}s{scope} are 1..{max_rank}")


def conv_input_dims(layer: str, in_channels: int,
                    input_shape: Sequence[int]) -> tuple[int, int, int]:
    """``(batch, H, W)`` of a conv input shape ``(N, C, H, W)`` or unbatched ``(C, H, W)``."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) not in (3, 4) or shape[-3] != in_channels:
        raise ValueError(f"{layer} expects an input shape (N, {in_channels}, H, W) or "
                         f"({in_channels}, H, W), got {shape}")
    return (shape[0] if len(shape) == 4 else 1), shape[-2], shape[-1]


def linear_batch(layer: str, in_features: int, input_shape: Sequence[int]) -> int:
    """Number of rows a linear layer sees for an input shape ``(*, in_features)``."""
    shape = tuple(int(s) for s in input_shape)
    if not shape or shape[-1] != in_features:
        raise ValueError(f"{layer} expects an input shape (*, {in_features}), got {shape}")
    return math.prod(shape[:-1])


def svd64(matrix: torch.Tensor, full: bool = False
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD in float64 (on the matrix's device; batched over leading dims), so that fits are
    exact to float64. ``full`` gives square singular-vector bases (thin by default)."""
    return torch.linalg.svd(matrix.detach().to(torch.float64), full_matrices=full)
