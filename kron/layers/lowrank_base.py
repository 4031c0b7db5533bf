"""The shared base of the low-rank baselines (docs/design.md, section 1).

Contract every low-rank layer keeps (the layer factory and surgery rely on it):

- ``max_rank(<geometry>)``, a classmethod: the largest rank the constructor accepts, per group.
  ``LowRankLinear.max_rank(in_features, out_features)``;
  ``SeparableConv2d.max_rank(in_channels, out_channels, kernel_size, groups=1)`` and the same
  for ``CPConv2d``; ``TuckerConv2d.max_rank(...)`` returns the pair ``(input_rank, output_rank)``
  in the constructor's order (a named tuple).
- Construction on ``device='meta'`` works (no data touched), so candidate layers can be counted.
- ``analytic_macs(input_shape)`` for batched or unbatched input equals the multiply-accumulates
  ``torch.utils.flop_counter.FlopCounterMode`` counts for the forward (bias adds not counted).
- ``from_conv(conv, rank)`` (Tucker: ``ranks``) / ``from_linear(linear, rank)`` fit the factors
  to a trained dense layer (SVD, HOSVD or CP, per group), copy every attribute (stride,
  padding, dilation, groups, padding_mode, bias, dtype, device), and are exact at ``max_rank``.
- ``dense_weight()`` is the composed weight in the torch layer's layout: ``(F, C/groups, kh,
  kw)`` for convs, ``(out, in)`` for the linear layer; the layer's forward equals the torch
  layer with the same arguments holding that weight and the layer's bias.
- Refusals (a rank out of range, a source of the wrong type) raise
  :class:`kron.layers.errors.FactorizationError` with one line naming the layer, the blocker
  and the nearest setting that works.

A conv layer is a chain of ``F.conv2d`` stages (:class:`Stage`), the bias on the last. A
grouped conv is ``groups`` independent convs: every stage is a grouped conv, so each group has
its own factors, and every parameter is its groups' blocks stacked along dim 0, which is how
:meth:`LowRankConv2d.dense_weight` and ``from_conv`` address them. Zero padding that is
symmetric is done by the spatial stages themselves (as before the rewrite, bit for bit); any
other padding (a non-zeros ``padding_mode``, asymmetric ``'same'``) pads once, with the layer's
mode, right before the first spatial stage, and the stages run unpadded. Both are exact: a
stage before it is a bias-free 1x1 conv, which commutes with every padding mode, and padding
the width commutes with a ``kh x 1`` conv.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kron.layers.common import factor_std, init_bias_, kaiming_std
from kron.layers.conv_args import ConvArgs, batched
from kron.layers.lowrank_checks import check_rank, conv_input_dims


@dataclass(frozen=True)
class Stage:
    """One ``F.conv2d`` of a factored conv: its weight (a parameter name) and arguments.
    ``pad_input``: pad with the layer's padding and mode before this stage."""

    weight: str
    groups: int
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    pad_input: bool = False


class LowRankBase(nn.Module):
    """Factor parameters, their PyTorch-default-variance init, fits' copy-in and the repr.

    Subclasses set ``init_order`` (the factor parameters, in the order they are drawn),
    ``init_terms`` (products summed per composed weight entry) and ``fan_in``.
    """

    init_order: tuple[str, ...] = ()
    init_terms: int = 1
    bias: nn.Parameter | None

    def _add(self, name: str, shape: Sequence[int], device, dtype) -> None:
        self.register_parameter(name, nn.Parameter(torch.empty(*shape, device=device,
                                                               dtype=dtype)))

    def _add_bias(self, features: int, bias: bool, device, dtype) -> None:
        if bias:
            self._add("bias", (features,), device, dtype)
        else:
            self.register_parameter("bias", None)

    @property
    def fan_in(self) -> int:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Normal factors whose composed weight has PyTorch's default variance
        ``1 / (3 fan_in)`` (``terms * prod Var(factor) = 1 / (3 fan_in)``); bias as PyTorch."""
        std = factor_std(kaiming_std(self.fan_in), len(self.init_order), self.init_terms)
        for name in self.init_order:
            nn.init.normal_(getattr(self, name), 0.0, std)
        init_bias_(self.bias, self.fan_in)

    def _load(self, blocks: dict[str, torch.Tensor], bias: torch.Tensor | None) -> None:
        """Copy fitted factors (any shape with the parameter's numel, dim 0 group-major) and
        the source's bias into the parameters, casting to their dtype."""
        with torch.no_grad():
            for name, value in blocks.items():
                param = getattr(self, name)
                param.copy_(value.reshape(param.shape))
            if self.bias is not None:
                self.bias.copy_(bias)

    def _geometry_repr(self) -> str:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def _rank_repr(self) -> str:
        return f"rank={self.rank}"

    def extra_repr(self) -> str:
        return f"{self._geometry_repr()}, {self._rank_repr()}, bias={self.bias is not None}"


def _arg(name: str) -> property:
    return property(lambda self: getattr(self.args, name),
                    doc=f"``nn.Conv2d``'s ``{name}`` (read-only; from ``self.args``).")


class LowRankConv2d(LowRankBase):
    """A conv as a chain of grouped ``F.conv2d`` stages: the constructor, the forward, the MAC
    count, the composed weight and the per-group fit, for the subclasses that define the
    factors (:meth:`_take_rank`, :meth:`_factors`, :meth:`_compose`).

    The constructor takes what ``nn.Conv2d`` takes, in its order, with the rank after the
    kernel size: ``rank`` per group (Tucker: ``ranks``).
    """

    in_channels = _arg("in_channels")
    out_channels = _arg("out_channels")
    kernel_size = _arg("kernel_size")
    stride = _arg("stride")
    padding = _arg("padding")
    dilation = _arg("dilation")
    groups = _arg("groups")
    padding_mode = _arg("padding_mode")
    stages: tuple[Stage, ...]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        rank: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: str | int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.args = ConvArgs.of(in_channels, out_channels, kernel_size, stride, padding,
                                dilation, groups, padding_mode, layer=type(self).__name__)
        self._take_rank(rank)
        self.stages = self._factors(device, dtype)
        self._add_bias(out_channels, bias, device, dtype)
        self.reset_parameters()

    def _take_rank(self, rank: int | Sequence[int]) -> None:
        """Check ``rank`` against the class's ``max_rank`` (per group) and set ``rank`` and
        ``init_terms``; Tucker, with a pair of ranks, overrides it."""
        a = self.args
        self.rank = self.init_terms = check_rank(
            type(self).__name__, self._dims(), "rank", rank,
            self.max_rank(a.in_channels, a.out_channels, a.kernel_size, a.groups), a.groups)

    def _factors(self, device, dtype) -> tuple[Stage, ...]:  # pragma: no cover - subclasses
        """Register the factor parameters; return the stages that apply them."""
        raise NotImplementedError

    @classmethod
    def group_shape(cls, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                    groups: int = 1) -> tuple[int, int, int, int]:
        """One group's kernel shape ``(F/groups, C/groups, kh, kw)`` (arguments checked)."""
        args = ConvArgs.of(in_channels, out_channels, kernel_size, groups=groups,
                           layer=cls.__name__)
        return (args.out_channels // args.groups, *args.weight_shape[1:])

    def _dims(self) -> str:
        """The geometry that bounds the rank, for error messages."""
        a = self.args
        s = f"in_channels={a.in_channels}, out_channels={a.out_channels}, " \
            f"kernel_size={a.kernel_size}"
        return s + (f", groups={a.groups}" if a.groups > 1 else "")

    @property
    def fan_in(self) -> int:
        return math.prod(self.args.weight_shape[1:])

    def _spatial(self, weight: str, groups: int, axes: str = "hw", first: bool = True) -> Stage:
        """A stage that convolves along ``axes`` ('h', 'w' or 'hw') with the layer's stride and
        dilation there; it pads itself when zero padding is symmetric, else the first spatial
        stage gets the input padded once (:class:`ConvArgs` ``pad_input``)."""
        own = self.args.pair_padding
        pad = own if own is not None else (0, 0)
        keep = ("h" in axes, "w" in axes)

        def pick(values: tuple[int, int], other: int) -> tuple[int, int]:
            return tuple(v if k else other for v, k in zip(values, keep))  # type: ignore

        return Stage(weight, groups, pick(self.args.stride, 1), pick(pad, 0),
                     pick(self.args.dilation, 1), pad_input=own is None and first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, unbatched = batched(x, 3, type(self).__name__, self.args.in_channels)
        last = len(self.stages) - 1
        for i, st in enumerate(self.stages):
            if st.pad_input:
                x = self.args.pad_input(x)
            x = F.conv2d(x, getattr(self, st.weight), self.bias if i == last else None,
                         st.stride, st.padding, st.dilation, st.groups)
        return x.squeeze(0) if unbatched else x

    def analytic_macs(self, input_shape: Sequence[int]) -> int:
        """Multiply-accumulates of the stages for ``(N, C, H, W)`` or ``(C, H, W)`` input:
        each output pixel of a stage costs its weight's numel (``out * in/groups * kh * kw``);
        padding and bias cost none."""
        n, h, w = conv_input_dims(type(self).__name__, self.args.in_channels, input_shape)
        left, right, top, bottom = self.args.pads
        macs = 0
        for st in self.stages:
            if st.pad_input:
                h, w = h + top + bottom, w + left + right
            shape = getattr(self, st.weight).shape
            h, w = ((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in
                    zip((h, w), shape[-2:], st.stride, st.padding, st.dilation))
            macs += n * h * w * math.prod(shape)
        return macs

    def grouped(self, name: str) -> torch.Tensor:
        """Parameter ``name`` as ``(groups, rows per group, ...)``: group ``g``'s factor at
        ``[g]`` (every stage is a grouped conv, so dim 0 is group-major)."""
        p = getattr(self, name)
        return p.reshape(self.args.groups, p.shape[0] // self.args.groups, *p.shape[1:])

    def dense_weight(self) -> torch.Tensor:
        """The composed kernel in ``nn.Conv2d``'s layout ``(F, C/groups, kh, kw)``."""
        return self._compose().flatten(0, 1)

    def _compose(self) -> torch.Tensor:  # pragma: no cover - every subclass defines it
        """Every group's composed kernel, ``(groups, F/groups, C/groups, kh, kw)``."""
        raise NotImplementedError

    @classmethod
    def _like(cls, conv: nn.Module, **ranks) -> tuple[LowRankConv2d, torch.Tensor]:
        """A layer with ``conv``'s every attribute and ``ranks``, and ``conv``'s kernel in
        float64 as ``(groups, F/groups, C/groups, kh, kw)``."""
        args = ConvArgs.from_conv(conv, layer=f"{cls.__name__}.from_conv")
        weight = conv.weight
        layer = cls(**args.conv_kwargs(), **ranks, bias=conv.bias is not None,
                    device=weight.device, dtype=weight.dtype)
        kernel = weight.detach().to(torch.float64)
        return layer, kernel.reshape(args.groups, -1, *kernel.shape[1:])

    def _geometry_repr(self) -> str:
        return self.args.extra_repr()
