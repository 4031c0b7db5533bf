"""Build the train and test transforms from the data config, so models never see dataset details.

The input is a loader item's uint8 tensor (C, H, W); the output is a normalised float32 tensor.
Config (`data.transforms`), every key optional except mean and std:

    mean: [..]  std: [..]      # per output channel, on the [0, 1] scale
    grayscale: false           # RGB to one channel, after the spatial ops (both stages)
    train / test:              # spatial ops, applied in this order
      resize: null             # int (shorter side) or [h, w]
      random_resized_crop: null  # int: ImageNet-style scale/aspect crop to that size
      center_crop: null        # int or [h, w]
      random_crop: null        # int or [h, w], with `padding` (int) and `fill` (0..255)
      hflip: false             # random horizontal flip
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torchvision.transforms import v2


def build_transform(cfg: Mapping[str, Any], train: bool) -> v2.Compose:
    """The `train` or `test` pipeline described by `cfg` (see the module docstring)."""
    stage = cfg.get("train" if train else "test") or {}
    ops: list[Any] = []
    if stage.get("resize"):
        ops.append(v2.Resize(_size(stage["resize"]), antialias=True))
    if stage.get("random_resized_crop"):
        ops.append(v2.RandomResizedCrop(_size(stage["random_resized_crop"]), antialias=True))
    if stage.get("center_crop"):
        ops.append(v2.CenterCrop(_size(stage["center_crop"])))
    if stage.get("random_crop"):
        ops.append(v2.RandomCrop(_size(stage["random_crop"]), padding=stage.get("padding") or None,
                                 fill=stage.get("fill", 0)))
    if stage.get("hflip"):
        ops.append(v2.RandomHorizontalFlip())
    ops.append(v2.ToDtype(torch.float32, scale=True))  # spatial ops above ran on uint8: faster
    if cfg.get("grayscale"):
        ops.append(v2.Grayscale(num_output_channels=1))  # on floats: no uint8 rounding
    ops.append(v2.Normalize(mean=list(cfg["mean"]), std=list(cfg["std"])))
    return v2.Compose(ops)


def _size(value: Any) -> int | list[int]:
    return int(value) if isinstance(value, int) else [int(v) for v in value]
