"""Tucker-2 convolution (Kim, Park, Yoo, Choi, Yang and Shin, ICLR 2016)."""

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


class TuckerConv2d(nn.Module):
    """1x1 conv ``C -> R_in``, ``kh x kw`` core ``R_in -> R_out``, 1x1 ``R_out -> F`` (+ bias).

    Kernel ``W[f, c, i, j] = sum_{a, b} U_out[f, b] G[b, a, i, j] U_in[a, c]``: a Tucker
    decomposition in the two channel modes only (Tucker-2). ``ranks = (R_in, R_out)`` with
    ``1 <= R_in <= C``, ``1 <= R_out <= F``. The core takes the layer's stride, padding and
    dilation; the 1x1 convs have no bias, so the layer equals ``F.conv2d(x, dense_weight(), ...)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        ranks: Sequence[int],
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
        dims = (
            f"in_channels={in_channels}, out_channels={out_channels}, "
            f"kernel_size={self.kernel_size}"
        )
        if not isinstance(ranks, Sequence) or isinstance(ranks, str) or len(ranks) != 2:
            raise ValueError(
                f"TuckerConv2d({dims}): ranks must be (input_rank, output_rank), got {ranks!r}"
            )
        r_in = check_rank("TuckerConv2d", dims, "input_rank", ranks[0], in_channels)
        r_out = check_rank("TuckerConv2d", dims, "output_rank", ranks[1], out_channels)
        self.ranks = (r_in, r_out)
        self.weight_in = nn.Parameter(torch.empty(r_in, in_channels, 1, 1, **kw))
        self.weight_core = nn.Parameter(torch.empty(r_out, r_in, kh, kwd, **kw))
        self.weight_out = nn.Parameter(torch.empty(out_channels, r_out, 1, 1, **kw))
        self.bias = nn.Parameter(torch.empty(out_channels, **kw)) if bias else None
        self.reset_parameters()

    @property
    def fan_in(self) -> int:
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def reset_parameters(self) -> None:
        """Normal factors with ``R_in R_out Var(U_in) Var(G) Var(U_out) = 1 / (3 fan_in)``."""
        std = factor_std(kaiming_std(self.fan_in), 3, self.ranks[0] * self.ranks[1])
        for weight in (self.weight_in, self.weight_core, self.weight_out):
            nn.init.normal_(weight, 0.0, std)
        init_bias_(self.bias, self.fan_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight_in)
        x = F.conv2d(x, self.weight_core, None, self.stride, self.padding, self.dilation)
        return F.conv2d(x, self.weight_out, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The composed ``(F, C, kh, kw)`` kernel."""
        return torch.einsum(
            "fb,baij,ac->fcij",
            self.weight_out[:, :, 0, 0],
            self.weight_core,
            self.weight_in[:, :, 0, 0],
        )

    def analytic_macs(self, input_shape: tuple[int, ...]) -> int:
        """Multiply-accumulates of the three convs for an ``(N, C, H, W)`` or ``(C, H, W)`` input
        (bias adds not counted)."""
        n, h, w = conv_input_dims("TuckerConv2d", self.in_channels, input_shape)
        (r_in, r_out), (kh, kw) = self.ranks, self.kernel_size
        ho, wo = conv_output_size(
            (h, w), self.kernel_size, self.stride, self.padding, self.dilation
        )
        return n * (
            h * w * r_in * self.in_channels
            + ho * wo * r_out * r_in * kh * kw
            + ho * wo * self.out_channels * r_out
        )

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ranks: Sequence[int]) -> TuckerConv2d:
        """HOSVD fit: ``U_out``, ``U_in`` are the leading left singular vectors of the mode-0
        (``F x C kh kw``) and mode-1 (``C x F kh kw``) unfoldings, and the core is the kernel
        projected onto them, ``G = W x_0 U_out^T x_1 U_in^T``.

        The result is the orthogonal projection of W onto those subspaces. It is exact when W has
        multilinear ranks at most ``(R_out, R_in)`` in the channel modes, and within a factor
        sqrt(2) of the best Tucker-2 fit in general, but NOT optimal (De Lathauwer, De Moor and
        Vandewalle 2000; iterating, as HOOI does, can lower the error).
        """
        layer = cls(ranks=ranks, **conv_kwargs(conv))
        r_in, r_out = layer.ranks
        kernel = conv.weight.detach().to(torch.float64)
        f, c, kh, kw = kernel.shape
        u_out = svd64(kernel.reshape(f, -1))[0][:, :r_out]
        u_in = svd64(kernel.transpose(0, 1).reshape(c, -1))[0][:, :r_in]
        core = torch.einsum("fcij,fb,ca->baij", kernel, u_out, u_in)
        with torch.no_grad():
            layer.weight_out.copy_(u_out[:, :, None, None])
            layer.weight_core.copy_(core)
            layer.weight_in.copy_(u_in.T[:, :, None, None])
            if layer.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"ranks={self.ranks}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, bias={self.bias is not None}"
        )
