"""Argument checks shared by the low-rank baselines: rank ranges, conv padding, source layers."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch

from kron.layers.common import check_source_conv, conv_kwargs, resolve_padding

__all__ = ["check_source_conv", "conv_kwargs", "resolve_padding"]  # re-exported


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
