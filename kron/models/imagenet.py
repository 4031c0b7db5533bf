"""ImageNet baselines: AlexNet in torchvision's layout, and torchvision's ResNets.

AlexNet is rebuilt here (same module names and shapes as ``torchvision.models.alexnet``, so
torchvision's pretrained state dict loads at width 1) because a width multiplier needs the
channel counts as parameters. Its "larger feature maps" variant uses stride 2 in the first
conv instead of 4 (4x the positions in every conv); the adaptive pool keeps the classifier's
input at 6x6. ResNets are torchvision's own; their larger-maps variant drops the stem max-pool.
"""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from kron.models.common import scale_width


class AlexNet(nn.Module):
    """torchvision's AlexNet (one-GPU variant) with a width multiplier and a stride knob."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, width: float = 1.0,
                 large_maps: bool = False, dropout: float = 0.5) -> None:
        super().__init__()
        c = [scale_width(n, width) for n in (64, 192, 384, 256, 256)]
        h = scale_width(4096, width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c[0], 11, stride=2 if large_maps else 4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(c[0], c[1], 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(c[1], c[2], 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c[2], c[3], 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c[3], c[4], 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(c[4] * 36, h),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(h, h),
            nn.ReLU(inplace=True),
            nn.Linear(h, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def alexnet(num_classes: int = 1000, in_channels: int = 3, width: float = 1.0,
            large_maps: bool = False, dropout: float = 0.5, pretrained: bool = False
            ) -> AlexNet:
    """AlexNet; ``pretrained`` loads torchvision's ImageNet weights (width 1, 1000 classes)."""
    net = AlexNet(num_classes, in_channels, width, large_maps, dropout)
    if pretrained:
        if width != 1.0 or num_classes != 1000 or in_channels != 3:
            raise ValueError("pretrained AlexNet needs width=1, num_classes=1000, in_channels=3")
        net.load_state_dict(tvm.alexnet(weights="DEFAULT").state_dict())
    return net


def resnet(arch: str = "resnet18", num_classes: int = 1000, in_channels: int = 3,
           width: float = 1.0, large_maps: bool = False, pretrained: bool = False
           ) -> nn.Module:
    """A torchvision ResNet (``arch`` e.g. resnet18, resnet50) as the modern reference.

    ``width`` maps to torchvision's ``width_per_group`` and so only applies to bottleneck
    ResNets (resnet50 and up); ``large_maps`` removes the stem max-pool.
    """
    kwargs: dict = {}
    if width != 1.0:
        if arch in ("resnet18", "resnet34"):
            raise ValueError(f"width != 1 needs a bottleneck ResNet (resnet50+), not {arch}")
        kwargs["width_per_group"] = scale_width(64, width)
    builder = getattr(tvm, arch, None)
    if builder is None or not arch.startswith("resnet"):
        raise ValueError(f"unknown ResNet arch {arch!r}; use resnet18/34/50/101/152")
    net = builder(weights="DEFAULT" if pretrained else None, **kwargs)
    if num_classes != net.fc.out_features:
        net.fc = nn.Linear(net.fc.in_features, num_classes)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    if large_maps:
        net.maxpool = nn.Identity()
    return net
