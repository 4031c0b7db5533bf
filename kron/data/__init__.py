"""kron's datasets, in their real on-disk formats, plus writers of those formats.

`build_datasets(cfg)` turns a data config (`configs/data/*.yaml`) into (train, test) datasets of
normalised float tensors; the classes below give raw `(uint8 tensor (C, H, W), int label)` items
with `transform=None`, and each has `.classes`. `build_loader` is the one DataLoader builder
(training and tests): per-rank shards, per-sample seeded augmentation, the config's loader
options. Every problem with files on disk raises `DatasetError` (or a subclass: `UnsafePathError`,
`kron.data.gnt.GntError`) with a one-line message saying what is wrong and how to fix it.
A data config's `name` selects a dataset registered with `register_dataset` (kron/data/registry.py:
a new dataset is one module plus one YAML file; `dataset_names()` lists them).

Names are imported on first use, so `python -m kron.data.hwdb` and friends run without the
package importing their module twice.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import DatasetError, UnsafePathError

_EXPORTS = {
    "SVHN": "svhn",
    "HWDB": "hwdb",
    "ICDAR03Chars": "scenetext",
    "Chars74K": "scenetext",
    "ImageNet": "imagenet",
    "build_dataset": "build",
    "build_datasets": "build",
    "build_loader": "build",
    "set_epoch": "build",
    "build_transform": "transforms",
    "register_dataset": "registry",
    "dataset_names": "registry",
    "dataset_entry": "registry",
    "unregister_dataset": "registry",
}

__all__ = [
    "DatasetError",
    "UnsafePathError",
    "SVHN",
    "HWDB",
    "ICDAR03Chars",
    "Chars74K",
    "ImageNet",
    "build_dataset",
    "build_datasets",
    "build_loader",
    "set_epoch",
    "build_transform",
    "register_dataset",
    "dataset_names",
    "dataset_entry",
    "unregister_dataset",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:  # for type checkers and IDEs
    from .build import build_dataset, build_datasets, build_loader, set_epoch
    from .hwdb import HWDB
    from .imagenet import ImageNet
    from .registry import dataset_entry, dataset_names, register_dataset, unregister_dataset
    from .scenetext import Chars74K, ICDAR03Chars
    from .svhn import SVHN
    from .transforms import build_transform
