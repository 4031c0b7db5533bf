"""Build the train and test transforms from the data config, so models never see dataset details.

The input is a loader item's uint8 tensor (C, H, W); the output is a normalised float32 tensor.
Config (`data.transforms`; its schema: kron/config_schema.py, TransformsConfig). mean, std,
train and test are required; an op or flag that is absent (or null / false) is off:

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
    stage = cfg["train" if train else "test"]
    ops: list[Any] = []
    if _on(stage, "resize"):
        ops.append(v2.Resize(_size(stage["resize"]), antialias=True))
    if _on(stage, "random_resized_crop"):
        ops.append(v2.RandomResizedCrop(_size(stage["random_resized_crop"]), antialias=True))
    if _on(stage, "center_crop"):
        ops.append(v2.CenterCrop(_size(stage["center_crop"])))
    if _on(stage, "random_crop"):
        padding = stage["padding"] if _on(stage, "padding") else None
        fill = {"fill": stage["fill"]} if "fill" in stage else {}  # absent: torchvision's (0)
        ops.append(v2.RandomCrop(_size(stage["random_crop"]), padding=padding, **fill))
    if _on(stage, "hflip"):
        ops.append(v2.RandomHorizontalFlip())
    ops.append(v2.ToDtype(torch.float32, scale=True))  # spatial ops above ran on uint8: faster
    if _on(cfg, "grayscale"):
        ops.append(v2.Grayscale(num_output_channels=1))  # on floats: no uint8 rounding
    ops.append(v2.Normalize(mean=list(cfg["mean"]), std=list(cfg["std"])))
    return v2.Compose(ops)


def _on(node: Mapping[str, Any], key: str) -> bool:
    """Whether an op or flag is set: present and not null / false / 0."""
    return key in node and bool(node[key])


def _size(value: Any) -> int | list[int]:
    return int(value) if isinstance(value, int) else [int(v) for v in value]
