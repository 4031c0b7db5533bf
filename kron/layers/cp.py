"""CP-decomposed convolution (Lebedev, Ganin, Rakhuba, Oseledets and Lempitsky, ICLR 2015)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kron.layers.common import (
    conv_geometry,
    conv_output_size,
    factor_std,
    init_bias_,
    kaiming_std,
)
from kron.layers.cp_als import cp_als, cp_exact
from kron.layers.lowrank_checks import check_rank, conv_input_dims, conv_kwargs


def cp_max_rank(out_channels: int, in_channels: int, kh: int, kw: int) -> int:
    """Trivial CP-rank bound of a ``(F, C, kh, kw)`` kernel: ``numel / max dim``."""
    dims = (out_channels, in_channels, kh, kw)
    return math.prod(dims) // max(dims)


class CPConv2d(nn.Module):
    """1x1 conv ``C -> R``, depthwise ``(kh x 1)``, depthwise ``(1 x kw)``, 1x1 ``R -> F`` (+ bias).

    Kernel ``W[f, c, i, j] = sum_r U_f[f, r] U_c[c, r] U_h[i, r] U_w[j, r]``, a rank-R CP
    decomposition. The vertical depthwise stage takes the vertical stride, padding and dilation,
    the horizontal one the horizontal ones; no bias between stages, so zero padding commutes
    with the 1x1 conv and the layer equals ``F.conv2d(x, dense_weight(), ...)`` exactly.
    Ranks run up to ``numel / max(F, C, kh, kw)``, where every kernel is exactly representable.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        rank: int,
        stride: int | Sequence[int] = 1,
        padding: str | int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = conv_geometry(
            kernel_size, stride, padding, dilation)
        kh, kwd = self.kernel_size
        self.rank = check_rank(
            "CPConv2d",
            f"in_channels={in_channels}, out_channels={out_channels}, "
            f"kernel_size={self.kernel_size}",
            "rank",
            rank,
            cp_max_rank(out_channels, in_channels, kh, kwd),
        )
        self.weight_in = nn.Parameter(torch.empty(self.rank, in_channels, 1, 1, **kw))
        self.weight_vertical = nn.Parameter(torch.empty(self.rank, 1, kh, 1, **kw))
        self.weight_horizontal = nn.Parameter(torch.empty(self.rank, 1, 1, kwd, **kw))
        self.weight_out = nn.Parameter(torch.empty(out_channels, self.rank, 1, 1, **kw))
        self.bias = nn.Parameter(torch.empty(out_channels, **kw)) if bias else None
        self.reset_parameters()

    @property
    def fan_in(self) -> int:
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def reset_parameters(self) -> None:
        """Normal factors with ``R * prod_k Var(U_k) = 1 / (3 fan_in)``, PyTorch's default."""
        std = factor_std(kaiming_std(self.fan_in), 4, self.rank)
        for weight in (self.weight_in, self.weight_vertical, self.weight_horizontal):
            nn.init.normal_(weight, 0.0, std)
        nn.init.normal_(self.weight_out, 0.0, std)
        init_bias_(self.bias, self.fan_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        r = self.rank
        x = F.conv2d(x, self.weight_in)
        x = F.conv2d(x, self.weight_vertical, None, (sh, 1), (ph, 0), (dh, 1), groups=r)
        x = F.conv2d(x, self.weight_horizontal, None, (1, sw), (0, pw), (1, dw), groups=r)
        return F.conv2d(x, self.weight_out, self.bias)

    def factors(self) -> list[torch.Tensor]:
        """``[U_f (F, R), U_c (C, R), U_h (kh, R), U_w (kw, R)]``, views of the parameters."""
        return [
            self.weight_out[:, :, 0, 0],
            self.weight_in[:, :, 0, 0].T,
            self.weight_vertical[:, 0, :, 0].T,
            self.weight_horizontal[:, 0, 0, :].T,
        ]

    def dense_weight(self) -> torch.Tensor:
        """The composed ``(F, C, kh, kw)`` kernel."""
        return torch.einsum("fr,cr,ir,jr->fcij", *self.factors())

    def analytic_macs(self, input_shape: tuple[int, ...]) -> int:
        """Multiply-accumulates of the four convs for ``(N, C, H, W)`` or ``(C, H, W)``; no bias."""
        n, h, w = conv_input_dims("CPConv2d", self.in_channels, input_shape)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
        )
        h1, _ = conv_output_size((h, w), (kh, 1), (sh, 1), (ph, 0), (dh, 1))
        _, w2 = conv_output_size((h1, w), (1, kw), (1, sw), (0, pw), (1, dw))
        per_rank = h * w * self.in_channels + h1 * w * kh + h1 * w2 * (kw + self.out_channels)
        return n * self.rank * per_rank

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, rank: int, n_iter_max: int = 1000, tol: float = 1e-9, seed: int = 0
    ) -> CPConv2d:
        """Fit by CP-ALS in float64 (``kron.layers.cp_als``), deterministic from an SVD start.

        ALS is a local method: it finds a good, not necessarily the best, rank-R fit (the best
        may not even exist, de Silva and Lim 2008). At the maximal rank the fit is the exact
        construction of ``cp_exact``.
        """
        layer = cls(rank=rank, **conv_kwargs(conv))
        rank = layer.rank
        kernel = conv.weight.detach().to(torch.float64)
        if rank == cp_max_rank(*kernel.shape):
            factors = cp_exact(kernel)
        else:
            factors, _ = cp_als(kernel, rank, n_iter_max=n_iter_max, tol=tol, seed=seed)
        u_f, u_c, u_h, u_w = factors
        with torch.no_grad():
            layer.weight_out.copy_(u_f[:, :, None, None])
            layer.weight_in.copy_(u_c.T[:, :, None, None])
            layer.weight_vertical.copy_(u_h.T[:, None, :, None])
            layer.weight_horizontal.copy_(u_w.T[:, None, None, :])
            if layer.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"rank={self.rank}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, bias={self.bias is not None}"
        )
