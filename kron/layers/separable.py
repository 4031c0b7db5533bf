"""Spatially separable low-rank convolution (Jaderberg, Vedaldi and Zisserman 2014, scheme 2)."""

from __future__ import annotations

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
from kron.layers.lowrank_checks import (
    check_rank,
    conv_input_dims,
    conv_kwargs,
    svd64,
)


class SeparableConv2d(nn.Module):
    """A ``(kh x 1)`` conv ``C -> rank`` then a ``(1 x kw)`` conv ``rank -> F`` (+ bias).

    The kernel is ``W[f, c, i, j] = sum_r H[f, r, j] V[r, c, i]``: the ``(C*kh) x (F*kw)``
    matrix ``W[(c, i), (f, j)]`` has rank ``rank``. The vertical stage takes the vertical
    stride, padding and dilation, the horizontal stage the horizontal ones; with no bias between
    the stages the zero padding of each stage equals the dense conv's padding, so the layer is
    exactly ``F.conv2d(x, dense_weight(), ...)``.
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
            "SeparableConv2d",
            f"in_channels={in_channels}, out_channels={out_channels}, "
            f"kernel_size={self.kernel_size}",
            "rank",
            rank,
            min(in_channels * kh, out_channels * kwd),
        )
        self.weight_vertical = nn.Parameter(torch.empty(self.rank, in_channels, kh, 1, **kw))
        self.weight_horizontal = nn.Parameter(torch.empty(out_channels, self.rank, 1, kwd, **kw))
        self.bias = nn.Parameter(torch.empty(out_channels, **kw)) if bias else None
        self.reset_parameters()

    @property
    def fan_in(self) -> int:
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def reset_parameters(self) -> None:
        """Normal factors with ``rank * Var(V) * Var(H) = 1 / (3 fan_in)``, PyTorch's default."""
        std = factor_std(kaiming_std(self.fan_in), 2, self.rank)
        nn.init.normal_(self.weight_vertical, 0.0, std)
        nn.init.normal_(self.weight_horizontal, 0.0, std)
        init_bias_(self.bias, self.fan_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        x = F.conv2d(x, self.weight_vertical, None, (sh, 1), (ph, 0), (dh, 1))
        return F.conv2d(x, self.weight_horizontal, self.bias, (1, sw), (0, pw), (1, dw))

    def dense_weight(self) -> torch.Tensor:
        """The composed ``(F, C, kh, kw)`` kernel."""
        return torch.einsum(
            "frj,rci->fcij", self.weight_horizontal[:, :, 0], self.weight_vertical[..., 0]
        )

    def analytic_macs(self, input_shape: tuple[int, ...]) -> int:
        """Multiply-accumulates of both convs for ``(N, C, H, W)`` or ``(C, H, W)``; no bias."""
        n, h, w = conv_input_dims("SeparableConv2d", self.in_channels, input_shape)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
        )
        h1, _ = conv_output_size((h, w), (kh, 1), (sh, 1), (ph, 0), (dh, 1))
        _, w2 = conv_output_size((h1, w), (1, kw), (1, sw), (0, pw), (1, dw))
        return n * self.rank * (h1 * w * self.in_channels * kh + h1 * w2 * self.out_channels * kw)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int) -> SeparableConv2d:
        """Optimal fit (Frobenius norm): truncated SVD of ``W[(c, i), (f, j)]``, a
        ``(C*kh) x (F*kw)`` matrix, with the singular values split evenly between the stages."""
        layer = cls(rank=rank, **conv_kwargs(conv))
        rank = layer.rank
        f, c, kh, kw = conv.weight.shape
        matrix = conv.weight.permute(1, 2, 0, 3).reshape(c * kh, f * kw)
        p, s, qh = svd64(matrix)
        root = s[:rank].sqrt()
        vertical = (p[:, :rank] * root).T.reshape(rank, c, kh, 1)
        horizontal = (root[:, None] * qh[:rank]).reshape(rank, f, 1, kw).transpose(0, 1)
        with torch.no_grad():
            layer.weight_vertical.copy_(vertical)
            layer.weight_horizontal.copy_(horizontal)
            if layer.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"rank={self.rank}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, bias={self.bias is not None}"
        )
