"""KronConv2d: a drop-in ``nn.Conv2d`` whose kernel is ``sum_i A_i (x) B_i`` (docs/design.md,
section 1 and D2)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kron.layers import cost_model
from kron.layers.conv_args import ConvArgs, batched
from kron.layers.decompose import b_shape_for
from kron.layers.kron_base import KroneckerSum
from kron.layers.kron_functional import kron_conv_group, kron_conv_group_convs
from kron.layers.macs import a_first, conv_group_macs, is_pointwise


class KronConv2d(KroneckerSum):
    """2-D convolution whose kernel is ``sum_i A_i (x) B_i`` (4-D ``torch.kron`` convention).

    Takes what ``nn.Conv2d`` takes: int/pair/'same' (asymmetric too)/'valid' padding, the four
    ``padding_mode`` values, ``groups`` (each of the ``groups`` blocks has its own factors;
    depthwise included) and unbatched ``(C, H, W)`` input. ``terms`` lists A shapes
    ``(F1, C1, kh1, kw1)`` dividing one block's kernel ``(F/groups, C/groups, kh, kw)``; B is
    the quotient. Factors of one shape are stored 4-D, ``a_factors[g]: (groups*R*F1, C1, kh1,
    kw1)`` (block-major, then term-major), so that ``channels_last`` works on them like on any
    conv weight. The factored forward runs two stages per term group
    (:func:`kron.layers.kron_functional.kron_conv_group`).

    ``grouped_conv_devices``: device types on which pointwise-A groups of an ungrouped layer
    run as one grouped conv plus one 1x1 conv (:mod:`kron.layers.kron_conv_grouped`, fast in
    cuDNN); a documented knob so tests can check that path on CPU.

    ``inference_chunk_floats``: CPU inference runs the samples in chunks whose intermediate
    holds at most this many elements per thread (512 KiB of float32 by default), so that each
    chunk's intermediate stays in cache between the two stages and every allocation stays
    small enough for the allocator to reuse (no fresh pages per call).
    """

    grouped_conv_devices: tuple[str, ...] = ("cuda",)
    inference_chunk_floats: int = 1 << 17

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        terms: Sequence[Sequence[int]],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        bias: bool = True,
        implementation: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        groups: int = 1,
        padding_mode: str = "zeros",
    ) -> None:
        args = ConvArgs.of(in_channels, out_channels, kernel_size, stride, padding, dilation,
                           groups, padding_mode, layer="KronConv2d")
        self.args = args
        self.in_channels, self.out_channels = args.in_channels, args.out_channels
        self.kernel_size, self.stride, self.dilation = args.kernel_size, args.stride, args.dilation
        self.padding, self.groups, self.padding_mode = args.padding, args.groups, args.padding_mode
        block = (args.out_channels // args.groups, *args.weight_shape[1:])
        super().__init__(block, args.groups, terms, bias, implementation, device, dtype)

    def _stored_shape(self, rank: int, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.blocks * rank * shape[0], *shape[1:])

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, terms: Sequence[Sequence[int]],
                  implementation: str = "auto", sweeps: int = 10) -> KronConv2d:
        """The Kronecker approximation of a trained ``nn.Conv2d`` with every attribute copied
        (geometry, groups, padding mode, bias, dtype, device); each block fitted on its own
        (optimal for one term shape, exact at full rank; see ``KronLinear.from_linear``)."""
        args = ConvArgs.from_conv(conv, "KronConv2d.from_conv")
        kw = args.conv_kwargs()
        groups, mode = kw.pop("groups"), kw.pop("padding_mode")
        layer = cls(terms=terms, implementation=implementation, bias=conv.bias is not None,
                    device=conv.weight.device, dtype=conv.weight.dtype, groups=groups,
                    padding_mode=mode, **kw)
        layer._load_dense(conv.weight, conv.bias, sweeps)
        return layer

    def factor_pairs(self, dtype: torch.dtype | None = None) -> list[tuple[torch.Tensor,
                                                                           torch.Tensor]]:
        """``(a (R, *a_shape), b (R, *b_shape))`` per term group for ``groups=1``; with
        several blocks ``(groups, R, *a_shape)`` (as :meth:`block_pairs`)."""
        pairs = self.block_pairs(dtype)
        return [(a[0], b[0]) for a, b in pairs] if self.blocks == 1 else pairs

    def output_size(self, hw: Sequence[int]) -> tuple[int, int]:
        return self.args.output_size(hw)

    # -- forward ----------------------------------------------------------------------------

    def _batch(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        return batched(x, 3, "KronConv2d", self.in_channels)

    def _forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        xb, unbatched = self._batch(x)
        pad = self.args.pair_padding
        if pad is None:
            xb, pad = self.args.pad_input(xb), (0, 0)
        y = F.conv2d(xb, self._cached_dense_weight(), self.bias, self.stride, pad,
                     self.dilation, self.groups)
        return y.squeeze(0) if unbatched else y

    def _forward_factored(self, x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        xb, unbatched = self._batch(x)
        channels_last = xb.is_contiguous(memory_format=torch.channels_last) and not (
            xb.is_contiguous())
        pairs = self.block_pairs(dtype)
        fast = self._fast_cpu_inference(xb)
        if (xb.device.type in self.grouped_conv_devices and self.blocks == 1
                and self.args.pair_padding is not None):
            out = self._factored_grouped(xb, pairs)
        elif fast:
            out = self._factored_in_chunks(xb.contiguous(), pairs)
        else:
            out = self._factored(xb.contiguous(), pairs, fast)
        bias = self._bias(out.dtype)
        if bias is not None:
            out = out.add_(bias.view(1, -1, 1, 1)) if fast else out + bias.view(1, -1, 1, 1)
        if channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out.squeeze(0) if unbatched else out

    def _factored_in_chunks(self, x: torch.Tensor, pairs: list) -> torch.Tensor:
        """CPU inference in chunks of samples (see ``inference_chunk_floats``), each written
        into the preallocated output: the 256->256 3x3 A(16, 16, 1, 1) layer at batch 32
        measured 2.9-3.3x against dense in fresh processes as one block, 5.2-5.4x in chunks of
        one sample (docs/notes/cpu_inference_memory.md)."""
        n, _, h, w = x.shape
        per_sample = self.blocks * h * w * max(
            rank * max(a[0] * b[1], a[1] * b[0])
            for (a, rank), b in ((g, b_shape_for(self.block_shape, g[0]))
                                 for g in self.term_groups))
        budget = self.inference_chunk_floats * max(1, torch.get_num_threads())
        chunk = max(1, min(n, budget // per_sample))
        if chunk >= n:
            return self._factored(x, pairs, True)
        out = x.new_empty((n, self.out_channels, *self.output_size((h, w))))
        for start in range(0, n, chunk):
            out[start:start + chunk].copy_(self._factored(x[start:start + chunk], pairs, True))
        return out

    def _factored(self, x: torch.Tensor, pairs: list, fast: bool,
                  only: Sequence[int] | None = None) -> torch.Tensor:
        """Every term group (or those in ``only``) by the two-stage formulas, summed; in CPU
        inference the A-first matmuls write into the layer's workspace and sums are in place."""
        out = None
        compiled_training = (torch.compiler.is_compiling() and not torch.compiler.is_exporting()
                             and self.records_autograd(x))
        for i, ((a_shape, rank), (a, b)) in enumerate(zip(self.term_groups, pairs)):
            if only is not None and i not in only:
                continue
            if compiled_training:
                y = kron_conv_group_convs(x, a, b, stride=self.stride, dilation=self.dilation,
                                          conv_padding=self.args.pair_padding,
                                          pad=self.args.pad_input)
                out = y if out is None else out + y
                continue
            ws = None
            if fast and a_first(a_shape, b_shape_for(self.block_shape, a_shape), self.stride):
                n, _, h, w = x.shape
                ws = self._workspace(x, n * self.blocks * a_shape[0] * rank * b.shape[3] * h * w)
            y = kron_conv_group(x, a, b, stride=self.stride, dilation=self.dilation,
                                conv_padding=self.args.pair_padding, pad=self.args.pad_input,
                                ws=ws)
            out = y if out is None else (out.add_(y) if fast else out + y)
        return out

    def _factored_grouped(self, x: torch.Tensor, pairs: list) -> torch.Tensor:
        """Pointwise-A groups as one grouped conv plus one 1x1 mixing conv
        (:func:`kron.layers.kron_conv_grouped.pointwise_kron_conv`, channels_last kept); the
        other groups by the two-stage formulas."""
        from kron.layers.kron_conv_grouped import pointwise_kron_conv

        out = None
        rest = []
        for i, ((a_shape, _), (a, b)) in enumerate(zip(self.term_groups, pairs)):
            if is_pointwise(a_shape):
                y = pointwise_kron_conv(x, a[0], b[0], self.stride, self.args.pair_padding,
                                        self.dilation)
                out = y if out is None else out + y
            else:
                rest.append(i)
        if rest:
            y = self._factored(x.contiguous(), pairs, False, only=rest)
            out = y if out is None else out + y
        return out

    # -- cost -------------------------------------------------------------------------------

    def dense_macs(self, input_shape: Sequence[int]) -> int:
        return self.args.dense_macs(input_shape)

    def group_macs(self, input_shape: Sequence[int]) -> list[int]:
        return [conv_group_macs(a, b_shape_for(self.block_shape, a), r, input_shape,
                                stride=self.stride, pads=self.args.pads, dilation=self.dilation,
                                blocks=self.blocks) for a, r in self.term_groups]

    def workload(self, input_shape: Sequence[int], device_type: str) -> cost_model.Workload:
        grouped = (device_type in self.grouped_conv_devices and self.blocks == 1
                   and "conv_grouped" in cost_model.constants_for(device_type).penalty)
        groups = []
        for (a, _), macs in zip(self.term_groups, self.group_macs(input_shape)):
            kind = "conv_spatial"
            if is_pointwise(a):
                kind = "conv_grouped" if grouped else "conv_pointwise"
            groups.append(cost_model.GroupCost(kind, macs, 3))
        return cost_model.Workload(self.dense_macs(input_shape), math.prod(self.weight_shape),
                                   tuple(r for _, r in self.term_groups),
                                   {"factored": tuple(groups)})

    def extra_repr(self) -> str:
        return (f"{self.args.extra_repr()}, bias={self.bias is not None}, "
                f"{self.extra_repr_terms()}")
