"""Scene-text character crops: ICDAR 2003 robust character recognition, and Chars74K English.

Both map to the same class sets: 62 classes `0-9 A-Z a-z` (case-sensitive), or 36 classes
`0-9 A-Z` with lower case folded into upper case. Items are (uint8 RGB (3, H, W), label) with
the crop's own size; the config's transforms resize them.
"""

from __future__ import annotations

import string
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import DatasetError, corrupt, inside, missing
from .images import is_image, read_image

CLASSES_62 = list(string.digits + string.ascii_uppercase + string.ascii_lowercase)
CLASSES_36 = list(string.digits + string.ascii_uppercase)
CHARS74K_SUBDIR = Path("English/Img/GoodImg/Bmp")


def class_list(case_sensitive: bool) -> list[str]:
    """The 62 or 36 class characters, in label order."""
    return list(CLASSES_62 if case_sensitive else CLASSES_36)


def char_label(char: str, case_sensitive: bool) -> int | None:
    """Label of a tag character, or None for punctuation and anything not alphanumeric ASCII."""
    if len(char) != 1 or char not in CLASSES_62:
        return None
    return CLASSES_62.index(char if case_sensitive else char.upper())


class _ImageList(Dataset):
    """A list of (image path, label) pairs read as uint8 RGB tensors."""

    what = "images"

    def __init__(self, samples: list[tuple[Path, int]], classes: list[str],
                 transform: Callable | None) -> None:
        self.samples, self.classes, self.transform = samples, classes, transform
        self.targets = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        img = read_image(path, self.what)
        if self.transform is not None:
            img = self.transform(img)
        return img, label


class ICDAR03Chars(_ImageList):
    """ICDAR 2003 robust character recognition: `root/char.xml` lists `<image file= tag=/>`.

    Paths in the XML are relative to `root` and must stay inside it (`..` or an absolute path
    that leads out is refused with `UnsafePathError`); non-alphanumeric tags are dropped. Point
    `root` at the folder holding `char.xml` of the training or the test set.
    """

    what = "ICDAR 2003 chars"

    def __init__(self, root: str | Path, case_sensitive: bool = True,
                 transform: Callable | None = None) -> None:
        self.root = Path(root)
        xml = self.root / "char.xml"
        if not xml.is_file():
            raise missing(self.what, xml,
                          "Download the ICDAR 2003 robust character recognition archives and "
                          f"extract them so that char.xml lies in {self.root}")
        try:
            tree = ET.parse(xml)
        except (ET.ParseError, UnicodeDecodeError) as err:
            raise corrupt(self.what, xml, err, "Re-extract char.xml") from None
        samples, absent, dropped = [], [], 0
        for node in tree.getroot().iter("image"):
            file, tag = node.get("file"), node.get("tag")
            if file is None or tag is None:
                raise corrupt(self.what, xml, "an <image> element lacks file= or tag=")
            label = char_label(tag, case_sensitive)
            if label is None:
                dropped += 1
                continue
            path = inside(self.root, file.replace("\\", "/"), self.what, xml)
            if not path.is_file():
                absent.append(path)
            samples.append((path, label))
        if absent:
            raise missing(self.what, absent[0],
                          f"{len(absent)} images listed in {xml} are absent; re-extract the "
                          "archive so that the paths in char.xml resolve from its folder")
        if not samples:
            raise corrupt(self.what, xml, "no alphanumeric <image file=... tag=.../> entries")
        self.dropped = dropped
        super().__init__(samples, class_list(case_sensitive), transform)


class Chars74K(_ImageList):
    """Chars74K English natural images: `root/English/Img/GoodImg/Bmp/Sample001..062/`.

    Sample001-010 are digits, 011-036 upper case, 037-062 lower case. The set has no official
    split: `split='train'`/`'test'` take a seeded, per-class split with `test_fraction` of each
    class in test; `'all'` keeps everything.
    """

    what = "Chars74K"

    def __init__(self, root: str | Path, case_sensitive: bool = True, split: str = "all",
                 transform: Callable | None = None, test_fraction: float = 0.25,
                 seed: int = 0) -> None:
        if split not in ("all", "train", "test"):
            raise DatasetError(f"{self.what}: unknown split {split!r}; use all, train or test.")
        self.root, self.split = Path(root), split
        base = self.root / CHARS74K_SUBDIR
        if not base.is_dir():
            raise missing(self.what, base,
                          "Download EnglishImg.tgz from the Chars74K page and extract it into "
                          f"{self.root}")
        rng = np.random.default_rng(seed)
        samples: list[tuple[Path, int]] = []
        for k in range(62):
            folder = base / f"Sample{k + 1:03d}"
            if not folder.is_dir():
                raise missing(self.what, folder, "The extraction is incomplete; re-extract it")
            files = sorted(p for p in folder.iterdir() if is_image(p))
            order = rng.permutation(len(files))
            n_test = int(round(test_fraction * len(files)))
            keep = {"all": order, "test": order[:n_test], "train": order[n_test:]}[split]
            label = char_label(CLASSES_62[k], case_sensitive)
            samples.extend((files[i], label) for i in sorted(keep))
        super().__init__(samples, class_list(case_sensitive), transform)
