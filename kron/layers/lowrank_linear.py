"""Low-rank linear layer ``W = U V``: the rank-r baseline that Kronecker layers generalise."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kron.layers.errors import FactorizationError
from kron.layers.lowrank_base import LowRankBase
from kron.layers.lowrank_checks import check_rank, linear_batch, svd64


class LowRankLinear(LowRankBase):
    """``y = x V^T U^T + b`` with ``U: (out, rank)``, ``V: (rank, in)``; two matmuls, W never
    built. Takes any leading dims, a 1-D ``(in,)`` input included, as ``nn.Linear`` does.

    ``from_linear`` fits ``U V`` by truncated SVD, the best rank-r approximation in Frobenius
    norm (Eckart-Young). With ``rank = max_rank(in, out) = min(in, out)`` it reproduces the
    dense layer.
    """

    init_order = ("weight_u", "weight_v")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank = self.init_terms = check_rank(
            type(self).__name__, self._geometry_repr(), "rank", rank,
            self.max_rank(in_features, out_features))
        self._add("weight_v", (self.rank, in_features), device, dtype)
        self._add("weight_u", (out_features, self.rank), device, dtype)
        self._add_bias(out_features, bias, device, dtype)
        self.reset_parameters()

    @classmethod
    def max_rank(cls, in_features: int, out_features: int) -> int:
        """``min(in, out)``, the rank of an ``(out, in)`` matrix."""
        if min(in_features, out_features) <= 0:
            raise ValueError(f"{cls.__name__}: in_features and out_features must be positive, "
                             f"got {in_features} and {out_features}")
        return min(in_features, out_features)

    @property
    def fan_in(self) -> int:
        return self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.weight_v), self.weight_u, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The composed ``(out, in)`` weight ``U V``."""
        return self.weight_u @ self.weight_v

    def analytic_macs(self, input_shape: tuple[int, ...]) -> int:
        """Multiply-accumulates of the two matmuls for an input ``(*, in)``; bias not counted."""
        rows = linear_batch(type(self).__name__, self.in_features, input_shape)
        return rows * self.rank * (self.in_features + self.out_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """Truncated-SVD fit of a dense layer: optimal in Frobenius norm (Eckart-Young).

        The singular values are split evenly, ``U = P sqrt(S)``, ``V = sqrt(S) Q^T``.
        """
        if not isinstance(linear, nn.Linear):
            raise FactorizationError(f"{cls.__name__}.from_linear: expected an nn.Linear, got "
                                     f"{type(linear).__name__}")
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
        p, s, qh = svd64(weight)
        root = s[: layer.rank].sqrt()
        layer._load({"weight_u": p[:, : layer.rank] * root,
                     "weight_v": root[:, None] * qh[: layer.rank]}, linear.bias)
        return layer

    def _geometry_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
