"""The arguments of a 2-D convolution, normalised once, as ``nn.Conv2d`` takes them.

Every factored conv layer (Kronecker and low-rank) accepts what ``nn.Conv2d`` accepts: an int
or pair for ``kernel_size``, ``stride`` and ``dilation``; ``padding`` as an int, a pair,
``'valid'`` or ``'same'`` (asymmetric when ``d*(k-1)`` is odd: the extra row/column goes to the
bottom/right, as ``nn.Conv2d`` does); the four ``padding_mode`` values; ``groups``; and unbatched
``(C, H, W)`` input. :class:`ConvArgs` holds the normalised values and the padding as the four
sides ``F.pad`` takes, so that a staged (factored) forward can pad the input once with the
layer's mode and run its stages unpadded, or, when that is the same thing (zero padding,
symmetric), let its first stage pad.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kron.layers.errors import FactorizationError

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def pair(value: int | Sequence[int], name: str = "value") -> tuple[int, int]:
    """An int or a 2-sequence as a pair of ints, as ``nn.Conv2d`` reads it."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (int(value), int(value))
    try:
        items = tuple(int(v) for v in value)  # type: ignore[union-attr]
    except TypeError:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(items) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return items  # type: ignore[return-value]


def same_pads(kernel_size: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` that keep the spatial size at stride 1 (``nn.Conv2d``'s
    rule: ``d*(k-1)`` split with the odd one on the right/bottom)."""
    (kh, kw), (dh, dw) = kernel_size, dilation
    th, tw = dh * (kh - 1), dw * (kw - 1)
    return (tw // 2, tw - tw // 2, th // 2, th - th // 2)


@dataclass(frozen=True)
class ConvArgs:
    """A 2-D convolution's geometry, normalised. ``pads`` is ``(left, right, top, bottom)``."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str  # as the user gave it, normalised ('same', 'valid' or a pair)
    dilation: tuple[int, int]
    groups: int
    padding_mode: str
    pads: tuple[int, int, int, int]

    @classmethod
    def of(
        cls,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        layer: str = "conv",
    ) -> ConvArgs:
        """Check and normalise ``nn.Conv2d``-style arguments; a wrong one is a one-line
        ``ValueError`` that names it (``layer`` names the layer class in the message)."""
        k, st, d = pair(kernel_size, "kernel_size"), pair(stride, "stride"), pair(dilation,
                                                                                  "dilation")
        c, f, g = int(in_channels), int(out_channels), int(groups)
        if min(c, f) <= 0:
            raise ValueError(f"{layer}: in_channels and out_channels must be positive, "
                             f"got {c} and {f}")
        if min(*k, *st, *d) <= 0:
            raise ValueError(f"{layer}: kernel_size, stride and dilation must be positive, got "
                             f"kernel_size={k}, stride={st}, dilation={d}")
        if g <= 0 or c % g or f % g:
            raise ValueError(f"{layer}: groups={g} must divide in_channels={c} and "
                             f"out_channels={f}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"{layer}: padding_mode must be one of {', '.join(PADDING_MODES)}, "
                             f"got {padding_mode!r}")
        if isinstance(padding, str):
            if padding == "valid":
                norm, pads = "valid", (0, 0, 0, 0)
            elif padding == "same":
                if st != (1, 1):
                    raise ValueError(f"{layer}: padding='same' needs stride 1 (as nn.Conv2d), "
                                     f"got stride={st}")
                norm, pads = "same", same_pads(k, d)
            else:
                raise ValueError(f"{layer}: padding must be 'valid', 'same', an int or a pair, "
                                 f"got {padding!r}")
        else:
            ph, pw = pair(padding, "padding")
            if min(ph, pw) < 0:
                raise ValueError(f"{layer}: padding must be non-negative, got {(ph, pw)}")
            norm, pads = (ph, pw), (pw, pw, ph, ph)
        return cls(c, f, k, st, norm, d, g, padding_mode, pads)

    @classmethod
    def from_conv(cls, conv: nn.Module, layer: str = "conv") -> ConvArgs:
        """The arguments of a dense ``nn.Conv2d`` (every attribute: groups and mode too)."""
        if not isinstance(conv, nn.Conv2d):
            raise FactorizationError(f"{layer}: expected an nn.Conv2d, got {type(conv).__name__}")
        return cls.of(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, conv.padding_mode, layer)

    # -- derived -----------------------------------------------------------------------------

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        """The dense kernel's shape, ``(out, in / groups, kh, kw)`` as in ``nn.Conv2d``."""
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def symmetric(self) -> bool:
        left, right, top, bottom = self.pads
        return left == right and top == bottom

    @property
    def any_padding(self) -> bool:
        return any(self.pads)

    @property
    def pair_padding(self) -> tuple[int, int] | None:
        """``(ph, pw)`` when a zero-padding conv stage can pad by itself (zeros, symmetric),
        else None: then :meth:`pad_input` pads once and the stages run unpadded."""
        if self.padding_mode != "zeros" or not self.symmetric:
            return None
        return (self.pads[2], self.pads[0])

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` padded on all four sides by the layer's padding, in its ``padding_mode``."""
        if not self.any_padding:
            return x
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, self.pads, mode=mode)

    def output_size(self, hw: Sequence[int]) -> tuple[int, int]:
        """Spatial output size on an ``(H, W)`` input (``nn.Conv2d``'s formula, per side)."""
        left, right, top, bottom = self.pads
        h, w = (int(s) for s in hw)
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        return ((h + top + bottom - dh * (kh - 1) - 1) // sh + 1,
                (w + left + right - dw * (kw - 1) - 1) // sw + 1)

    def dense_macs(self, input_shape: Sequence[int]) -> int:
        """MACs of the dense conv on ``(N, C, H, W)`` or unbatched ``(C, H, W)`` input (bias
        not counted): every output pixel of every output channel costs one MAC per weight of
        its filter, ``C / groups * kh * kw``."""
        n = int(input_shape[0]) if len(input_shape) == 4 else 1
        ho, wo = self.output_size(input_shape[-2:])
        return n * math.prod(self.weight_shape) * ho * wo

    def conv_kwargs(self) -> dict:
        """Keyword arguments that build the equivalent ``nn.Conv2d`` (no bias, device, dtype)."""
        return dict(in_channels=self.in_channels, out_channels=self.out_channels,
                    kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                    dilation=self.dilation, groups=self.groups, padding_mode=self.padding_mode)

    def extra_repr(self) -> str:
        """The geometry part of a layer's repr, in ``nn.Conv2d``'s words."""
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if self.padding not in ((0, 0), "valid"):
            s += f", padding={self.padding!r}" if isinstance(self.padding, str) else \
                f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s


def batched(x: torch.Tensor, dims: int, layer: str, channels: int) -> tuple[torch.Tensor, bool]:
    """``(x as a batch, was it unbatched)`` for a conv input of ``dims`` dimensions per sample
    (``(C, H, W)`` for 2-D), as ``nn.Conv2d`` accepts both; a wrong rank or channel count is a
    one-line ``ValueError``."""
    if x.dim() == dims:
        x, unbatched = x.unsqueeze(0), True
    elif x.dim() == dims + 1:
        unbatched = False
    else:
        raise ValueError(f"{layer} expects input (N, {channels}, H, W) or ({channels}, H, W), "
                         f"got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{layer} expects {channels} input channels, got shape "
                         f"{tuple(x.shape[1:] if unbatched else x.shape)}")
    return x, unbatched
