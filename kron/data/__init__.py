"""kron's datasets, in their real on-disk formats, plus writers of those formats.

`build_datasets(cfg)` turns a data config (`configs/data/*.yaml`) into (train, test) datasets of
normalised float tensors; the classes below give raw `(uint8 tensor (C, H, W), int label)` items
with `transform=None`, and each has `.classes`. Every problem with files on disk raises
`DatasetError` with a one-line message saying what is wrong and how to fix it.
"""

from .build import build_dataset, build_datasets, build_loader
from .errors import DatasetError
from .hwdb import HWDB
from .imagenet import ImageNet
from .scenetext import Chars74K, ICDAR03Chars
from .svhn import SVHN
from .transforms import build_transform

__all__ = [
    "SVHN",
    "HWDB",
    "ICDAR03Chars",
    "Chars74K",
    "ImageNet",
    "DatasetError",
    "build_dataset",
    "build_datasets",
    "build_loader",
    "build_transform",
]
