"""CASIA-HWDB baseline (64x64 grey, 3,755 classes): a reconstruction, not the paper's net.

The paper does not state this architecture. Offline handwritten-Chinese CNNs of 2013-2015
(e.g. the ICDAR 2013 winners) were six to eight 3x3 conv layers with pools on 48-64 px input
and one wide FC layer before a 3,755-way classifier; this follows that pattern with widths
growing 32 -> 384 and a 2048-unit FC layer.
"""

from __future__ import annotations

from kron.models.common import PlainConvNet

HWDB_CONVS = [(32, True), (128, True), (256, False), (256, True), (384, False), (384, True)]
HWDB_HIDDEN = [2048]


def hwdb_net(
    num_classes: int = 3755,
    in_channels: int = 1,
    input_size: int = 64,
    width: float = 1.0,
    large_maps: bool = False,
    norm: str = "batch",
    dropout: float = 0.0,
) -> PlainConvNet:
    """The reconstructed CASIA-HWDB baseline."""
    return PlainConvNet(in_channels, num_classes, input_size, HWDB_CONVS, HWDB_HIDDEN,
                        width=width, large_maps=large_maps, norm=norm, dropout=dropout)
