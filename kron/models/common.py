"""Building blocks shared by the reconstructed baseline nets."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn


def scale_width(channels: int, width: float, multiple: int = 4) -> int:
    """``channels * width`` rounded to a multiple of ``multiple`` (at least ``multiple``).

    Rounding keeps channel counts divisible by small Kronecker factors at every width.
    """
    return max(multiple, int(round(channels * width / multiple)) * multiple)


class PlainConvNet(nn.Module):
    """A 2015-style plain CNN: a stem conv, 3x3 conv (+BN) + ReLU blocks with 2x2 max-pools,
    then an MLP.

    ``convs`` lists ``(out_channels, pool_after)`` per conv layer; the first is the stem, with
    kernel ``stem_kernel`` and stride ``stem_stride``, the others are 3x3, stride 1. ``hidden``
    lists the widths of the fully-connected layers before the classifier. Module names are
    stable so that layer surgery can address them: ``features.conv{i}``, ``classifier.fc{i}``
    (1-based hidden layers) and ``classifier.out`` (the final classifier layer).

    ``large_maps`` is the paper's "larger feature maps" variant: the first 2x downsampling (a
    strided stem, else the first pool) moves to the end of the conv stack, so every conv after
    it runs on 2x higher resolution (4x the positions) while the classifier's input stays the
    same size.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        input_size: int,
        convs: Sequence[tuple[int, bool]],
        hidden: Sequence[int],
        width: float = 1.0,
        large_maps: bool = False,
        norm: str = "batch",
        dropout: float = 0.0,
        stem_kernel: int = 3,
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        if norm not in ("batch", "none"):
            raise ValueError(f"norm must be 'batch' or 'none', got {norm!r}")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        pools = [bool(p) for _, p in convs]
        extra_pool = large_maps and (stem_stride == 2 or any(pools))
        if large_maps and stem_stride == 2:
            stem_stride = 1
        elif extra_pool:
            pools[pools.index(True)] = False
        feats: OrderedDict[str, nn.Module] = OrderedDict()
        c, n_pool = in_channels, 0
        for i, ((out, _), pool) in enumerate(zip(convs, pools), start=1):
            out = scale_width(out, width)
            k, st = (stem_kernel, stem_stride) if i == 1 else (3, 1)
            feats[f"conv{i}"] = nn.Conv2d(c, out, k, stride=st, padding=k // 2,
                                          bias=norm == "none")
            if norm == "batch":
                feats[f"bn{i}"] = nn.BatchNorm2d(out)
            feats[f"relu{i}"] = nn.ReLU(inplace=True)
            if pool:
                n_pool += 1
                feats[f"pool{n_pool}"] = nn.MaxPool2d(2)
            c = out
        if extra_pool:
            n_pool += 1
            feats[f"pool{n_pool}"] = nn.MaxPool2d(2)
        self.features = nn.Sequential(feats)
        side = input_size // 2 ** (n_pool + stem_stride - 1)
        if side < 1:
            raise ValueError(f"input_size {input_size} is too small for {n_pool} 2x2 pools")
        head: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        d = c * side * side
        for i, h in enumerate(hidden, start=1):
            h = scale_width(h, width)
            head[f"fc{i}"] = nn.Linear(d, h)
            head[f"relu{i}"] = nn.ReLU(inplace=True)
            if dropout > 0:
                head[f"drop{i}"] = nn.Dropout(dropout)
            d = h
        head["out"] = nn.Linear(d, num_classes)
        self.classifier = nn.Sequential(head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
