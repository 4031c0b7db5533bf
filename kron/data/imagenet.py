"""ImageNet (ILSVRC2012) in the `ImageFolder` layout, and sorting the flat validation folder.

Expected: `root/train/<wnid>/*.JPEG` and `root/val/<wnid>/*.JPEG`. The validation archive
extracts flat (`val/ILSVRC2012_val_00000001.JPEG` ...); `sort_val` (also
`scripts/sort_imagenet_val.py`) moves each image into its class folder using the devkit's
ground truth (`data/ILSVRC2012_validation_ground_truth.txt` + `data/meta.mat`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.io
import torch
from torch.utils.data import Dataset

from .errors import DatasetError, corrupt, inside, missing
from .images import is_image, read_image

WHAT = "ImageNet"
SORT_HINT = (
    "Sort it with `python scripts/sort_imagenet_val.py --val {val} --devkit "
    "DEVKIT_DIR` (see data/README.md)"
)


class ImageNet(Dataset):
    """One split (`train` or `val`) of ImageNet; items are (uint8 RGB (3, H, W), label).

    `.classes` are the WordNet ids (sorted; label = position), as torchvision's ImageFolder.
    """

    def __init__(self, root: str | Path, split: str = "train",
                 transform: Callable | None = None) -> None:
        if split not in ("train", "val"):
            raise DatasetError(f"{WHAT}: unknown split {split!r}; use train or val.")
        self.root, self.split, self.transform = Path(root), split, transform
        folder = self.root / split
        if not folder.is_dir():
            raise missing(WHAT, folder,
                          f"Extract ILSVRC2012_img_{split}.tar into {folder}"
                          + (" and sort it into class folders" if split == "val" else ""))
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
        self.classes = [e.name for e in entries if e.is_dir()]
        if not self.classes:
            if any(is_image(e.name) for e in entries):
                raise DatasetError(
                    f"{WHAT}: {folder} holds images but no class folders. "
                    + SORT_HINT.format(val=folder) + "."
                )
            raise missing(WHAT, folder / "<wnid>", f"Extract ILSVRC2012_img_{split}.tar there")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for label, wnid in enumerate(self.classes):
            names = sorted(e.name for e in os.scandir(folder / wnid) if is_image(e.name))
            self.samples.extend((str(folder / wnid / n), label) for n in names)
        if not self.samples:
            raise missing(WHAT, folder / "<wnid>/*.JPEG", "The class folders are empty; re-extract")
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        img = read_image(path, WHAT)
        if self.transform is not None:
            img = self.transform(img)
        return img, label


def read_devkit(devkit: str | Path) -> list[str]:
    """The WNID of each validation image (index 0 = ILSVRC2012_val_00000001) from the devkit."""
    data = _data_dir(devkit)
    meta, truth = data / "meta.mat", data / "ILSVRC2012_validation_ground_truth.txt"
    for path in (meta, truth):
        if not path.is_file():
            raise missing(WHAT, path, "Extract ILSVRC2012_devkit_t12.tar.gz and pass its folder")
    try:
        synsets = np.atleast_1d(scipy.io.loadmat(str(meta), squeeze_me=True)["synsets"])
        id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    except Exception as err:  # scipy's errors for a bad .mat vary; all mean the same here
        raise corrupt(WHAT, meta, err, "Re-extract the devkit") from None
    try:
        ids = [int(line) for line in truth.read_text().split()]
        return [id_to_wnid[i] for i in ids]
    except (ValueError, KeyError) as err:
        raise corrupt(WHAT, truth, err, "Re-extract the devkit") from None


def _data_dir(devkit: str | Path) -> Path:
    """The devkit folder holding meta.mat: `devkit/data`, or `devkit` itself."""
    devkit = Path(devkit)
    return devkit / "data" if (devkit / "data").is_dir() else devkit


def sort_val(val: str | Path, devkit: str | Path, dry_run: bool = False) -> int:
    """Move `val/ILSVRC2012_val_%08d.JPEG` into `val/<wnid>/`; returns how many were moved.

    Files already sorted are left alone, so an interrupted run can be resumed. Every WNID is
    checked to be a plain folder name before anything moves (`UnsafePathError` otherwise), so a
    damaged `meta.mat` cannot move images outside `val`.
    """
    val = Path(val)
    if not val.is_dir():
        raise missing(WHAT, val, "Extract ILSVRC2012_img_val.tar there")
    wnids = read_devkit(devkit)
    meta = _data_dir(devkit) / "meta.mat"
    folders = {w: inside(val, w, WHAT, meta, single=True) for w in sorted(set(wnids))}
    moved = 0
    for i, wnid in enumerate(wnids, start=1):
        src = next((val / f"ILSVRC2012_val_{i:08d}{ext}" for ext in (".JPEG", ".jpeg", ".jpg",
                    ".png") if (val / f"ILSVRC2012_val_{i:08d}{ext}").is_file()), None)
        if src is None:
            continue
        moved += 1
        if not dry_run:
            folders[wnid].mkdir(exist_ok=True)
            os.replace(src, folders[wnid] / src.name)
    left = [p.name for p in val.iterdir() if p.is_file() and is_image(p)]
    if left and not dry_run:
        raise DatasetError(
            f"{WHAT}: {len(left)} images in {val} (e.g. {left[0]}) have no entry in the "
            "devkit's ground truth; check that the devkit matches this validation set."
        )
    return moved
