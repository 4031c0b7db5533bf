"""SVHN baseline (32x32 colour digits, 10 classes): a reconstruction, not the paper's net.

The paper does not state its SVHN architecture. This is a plain 2015-style stack (five 3x3
convs, three pools, a 2048-2048 MLP), chosen so that almost all of its cost sits in the wide
3x3 convs and the big fully-connected layers that Kronecker layers make cheap; the first conv
(3 input channels) is deliberately narrow because nothing factors it. See configs/model/svhn.yaml.
"""

from __future__ import annotations

from kron.models.common import PlainConvNet

#: (out_channels, pool_after) per conv at width 1.
SVHN_CONVS = [(32, True), (128, False), (128, True), (256, False), (256, True)]
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
    the resolution of all convs after the first."""
    return PlainConvNet(in_channels, num_classes, input_size, SVHN_CONVS, SVHN_HIDDEN,
                        width=width, large_maps=large_maps, norm=norm, dropout=dropout)
