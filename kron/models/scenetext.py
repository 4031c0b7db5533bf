"""Scene-text character baseline (grey 32x32 crops, 62 or 36 classes): a reconstruction.

The paper does not state this architecture. Character-crop CNNs of the time (e.g. Jaderberg
et al. 2014) were four or five conv layers and a wide MLP on 24-32 px grey crops; this is the
same plain stack as the SVHN baseline with one input channel and a 1024-1024 MLP, since the
character sets are small (a few thousand training crops).
"""

from __future__ import annotations

from kron.models.common import PlainConvNet

SCENETEXT_CONVS = [(32, True), (128, False), (128, True), (256, False), (256, True)]
SCENETEXT_HIDDEN = [1024, 1024]


def scenetext_net(
    num_classes: int = 62,
    in_channels: int = 1,
    input_size: int = 32,
    width: float = 1.0,
    large_maps: bool = False,
    norm: str = "batch",
    dropout: float = 0.0,
) -> PlainConvNet:
    """The reconstructed scene-text character baseline."""
    return PlainConvNet(in_channels, num_classes, input_size, SCENETEXT_CONVS, SCENETEXT_HIDDEN,
                        width=width, large_maps=large_maps, norm=norm, dropout=dropout)
