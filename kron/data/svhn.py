"""SVHN cropped digits, read from the official MATLAB `.mat` files with scipy.

torchvision's `SVHN` always checks the official MD5s, so it cannot read a generated file; this
loader reads `root/{split}_32x32.mat` itself and makes the check optional (`verify_md5`), so the
same code serves the real set and kron's synthetic stand-in.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.io
import torch
from torch.utils.data import Dataset

from kron.fileio import md5sum

from .errors import DatasetError, corrupt, missing

SPLITS = ("train", "test", "extra")
MD5 = {
    "train": "e26dedcc434d2e4c54c9b2d4a06d8373",
    "test": "eb5a983be6a315427106f1b164d9cef3",
    "extra": "a93ce644f1a588dc4d68dda5feec44a7",
}
URL = "http://ufldl.stanford.edu/housenumbers/"
CLASSES = [str(d) for d in range(10)]


def svhn_file(root: str | Path, split: str) -> Path:
    """Where split `split` lives under `root`: `root/{split}_32x32.mat`."""
    return Path(root) / f"{split}_32x32.mat"


def read_svhn_mat(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one SVHN `.mat`: images uint8 (N, 3, 32, 32) and labels int64 (N,) in 0..9.

    The file stores `X` as (32, 32, 3, N) and `y` as (N, 1) with 10 meaning digit 0.
    """
    what = "SVHN"
    try:
        mat = scipy.io.loadmat(str(path), variable_names=("X", "y"))
    except Exception as err:  # scipy raises several unrelated types for a bad file
        raise corrupt(what, path, err) from None
    if "X" not in mat or "y" not in mat:
        raise corrupt(what, path, "no 'X' and 'y' variables; not an SVHN cropped-digits file")
    x, y = mat["X"], mat["y"]
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
        raise corrupt(what, path, f"X is {x.dtype} {x.shape}, expected uint8 (32, 32, 3, N)")
    y = y.reshape(-1).astype(np.int64)
    if y.shape[0] != x.shape[3]:
        raise corrupt(what, path, f"{x.shape[3]} images but {y.shape[0]} labels")
    if y.size and (y.min() < 0 or y.max() > 10):
        raise corrupt(what, path, f"labels span {y.min()}..{y.max()}, expected 1..10")
    y[y == 10] = 0
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y


class SVHN(Dataset):
    """SVHN split `train`, `test`, `extra` or `train+extra`; items are (uint8 (3,32,32), label).

    `verify_md5` compares each file with the official checksum (turn it off for generated
    files). The whole split is held in memory as uint8 (train+extra is about 1.9 GB).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable | None = None,
        verify_md5: bool = True,
    ) -> None:
        parts = split.split("+")
        if not parts or any(p not in SPLITS for p in parts):
            raise DatasetError(
                f"SVHN: unknown split {split!r}; use one of train, test, extra, train+extra."
            )
        self.root, self.split, self.transform = Path(root), split, transform
        self.classes = list(CLASSES)
        xs, ys = [], []
        for part in parts:
            path = svhn_file(root, part)
            if not path.is_file():
                raise missing(
                    "SVHN", path,
                    f"Download {path.name} from {URL} into {path.parent}, "
                    "or use data=synth_svhn for the generated stand-in",
                )
            if verify_md5:
                digest = md5sum(path)
                if digest != MD5[part]:
                    raise DatasetError(
                        f"SVHN: {path} has MD5 {digest}, not the official {MD5[part]}: it is "
                        "corrupt or not the official file. Re-download it, or set "
                        f"data.verify_md5=false if it is a generated file (see data/README.md)."
                    )
            x, y = read_svhn_mat(path)
            xs.append(x)
            ys.append(y)
        self.data = torch.from_numpy(xs[0] if len(xs) == 1 else np.concatenate(xs))
        self.targets = torch.from_numpy(ys[0] if len(ys) == 1 else np.concatenate(ys))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, label = self.data[index], int(self.targets[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, label
