"""SVHN baseline (32x32 colour digits, 10 classes): a reconstruction, not the paper's net.

The paper does not state its SVHN architecture. This is a plain 2015-style stack: a narrow
5x5 stride-2 stem (3 input channels: nothing to factor, so it is kept cheap), four 3x3 convs
(32->128 at 16x16, then 128->256->256->256 at 8x8), two pools, and a 4096->2048->2048 MLP.
Almost all of its cost sits in the wide 3x3 convs at 8x8 and the big FC layers, the layers the
paper swaps for Kronecker ones; elementwise work (BN, ReLU, pools) is a small share, so a
cheaper swapped layer shows up as measured speed. See configs/model/svhn.yaml.
"""

from __future__ import annotations

from kron.models.common import PlainConvNet

#: (out_channels, pool_after) per conv at width 1.
SVHN_CONVS = [(32, False), (128, True), (256, False), (256, False), (256, True)]
SVHN_STEM = (5, 2)  # kernel, stride
SVHN_HIDDEN = [2048, 2048]


def svhn_net(
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
    width: float = 1.0,
    large_maps: bool = False,
    norm: str = "batch",
    dropout: float = 0.0,
) -> PlainConvNet:
    """The reconstructed SVHN baseline; ``width`` scales every layer, ``large_maps`` doubles
    the resolution of all convs after the first (stride-1 stem)."""
    return PlainConvNet(in_channels, num_classes, input_size, SVHN_CONVS, SVHN_HIDDEN,
                        width=width, large_maps=large_maps, norm=norm, dropout=dropout,
                        stem_kernel=SVHN_STEM[0], stem_stride=SVHN_STEM[1])
