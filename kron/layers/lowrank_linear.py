"""Low-rank linear layer ``W = U V``: the rank-r baseline that Kronecker layers generalise."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kron.layers.common import factor_std, init_bias_, kaiming_std
from kron.layers.lowrank_checks import check_rank, linear_batch, svd64


class LowRankLinear(nn.Module):
    """``y = x V^T U^T + b`` with ``U: (out, rank)``, ``V: (rank, in)``; two matmuls, W never built.

    ``from_linear`` fits ``U V`` by truncated SVD, the best rank-r approximation in Frobenius
    norm (Eckart-Young). With ``rank = min(in, out)`` it reproduces the dense layer.
    """

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
        kw = dict(device=device, dtype=dtype)
        self.in_features, self.out_features = in_features, out_features
        self.rank = check_rank(
            "LowRankLinear",
            f"in_features={in_features}, out_features={out_features}",
            "rank",
            rank,
            min(in_features, out_features),
        )
        self.weight_v = nn.Parameter(torch.empty(self.rank, in_features, **kw))
        self.weight_u = nn.Parameter(torch.empty(out_features, self.rank, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal factors with ``rank * Var(U) * Var(V) = 1 / (3 in)``, PyTorch's default."""
        std = factor_std(kaiming_std(self.in_features), 2, self.rank)
        nn.init.normal_(self.weight_u, 0.0, std)
        nn.init.normal_(self.weight_v, 0.0, std)
        init_bias_(self.bias, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.weight_v), self.weight_u, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The composed ``(out, in)`` weight ``U V``."""
        return self.weight_u @ self.weight_v

    def analytic_macs(self, input_shape: tuple[int, ...]) -> int:
        """Multiply-accumulates of the two matmuls for an input ``(*, in)``; bias not counted."""
        rows = linear_batch("LowRankLinear", self.in_features, input_shape)
        return rows * self.rank * (self.in_features + self.out_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """Truncated-SVD fit of a dense layer: optimal in Frobenius norm (Eckart-Young).

        The singular values are split evenly, ``U = P sqrt(S)``, ``V = sqrt(S) Q^T``.
        """
        weight = linear.weight
        out_features, in_features = weight.shape
        layer = cls(
            in_features,
            out_features,
            rank,
            bias=linear.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        rank = layer.rank
        p, s, qh = svd64(weight)
        root = s[:rank].sqrt()
        with torch.no_grad():
            layer.weight_u.copy_(p[:, :rank] * root)
            layer.weight_v.copy_(root[:, None] * qh[:rank])
            if layer.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}"
        )
