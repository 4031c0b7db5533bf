"""Writers of small, valid files in each dataset's real on-disk format, and synthetic SVHN.

Tests use the writers to drive the real loaders and the converter end to end; `data=synth_svhn`
uses `ensure_synth_svhn` to create its default dataset on first use. Every file is written to
a temporary name in its folder and renamed into place.

Command line:
`python -m kron.data.synthetic svhn --out DIR --n-train N --n-test N --seed S [--difficulty hard]`
`python -m kron.data.synthetic gnt --out FILE.gnt --n N --seed S [--classes K]`
`python -m kron.data.synthetic hwdb --out FILE.h5 --classes K --n-train N --n-test N --seed S`
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from kron.fileio import atomic_path

from .gnt import char_to_code, encode_record
from .hwdb import convert as convert_gnt
from .scenetext import CHARS74K_SUBDIR
from .svhn import svhn_file
from .synth_hwdb import glyph_records
from .synth_svhn import LEVELS, render_split
from .synth_svhn import difficulty as synth_difficulty

SYNTH_META = "synth_svhn.json"
SYNTH_HWDB_VERSION = 1  # bump when the glyph renderer changes, so cached files are redrawn
_PIL_FORMAT = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "bmp": "BMP"}


def write_svhn_mat(path: str | Path, images: np.ndarray, labels: Sequence[int]) -> Path:
    """Write an SVHN `.mat`: `images` uint8 (N, 3, 32, 32), `labels` 0..9 (stored as 1..10)."""
    images = np.asarray(images, dtype=np.uint8)
    if images.ndim != 4 or images.shape[1:] != (3, 32, 32):
        raise ValueError(f"images must be (N, 3, 32, 32), got {images.shape}")
    y = np.asarray(labels, dtype=np.uint8).reshape(-1, 1).copy()
    y[y == 0] = 10
    x = np.ascontiguousarray(images.transpose(2, 3, 1, 0))  # (32, 32, 3, N) as in the real file
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        scipy.io.savemat(f, {"X": x, "y": y}, format="5")
    return Path(path)


def write_svhn(root: str | Path, split: str, images: np.ndarray, labels: Sequence[int]) -> Path:
    """Write split `split` where `SVHN(root, split)` reads it: `root/{split}_32x32.mat`."""
    return write_svhn_mat(svhn_file(root, split), images, labels)


def _synth_meta(n_train: int, n_test: int, seed: int, difficulty: str) -> dict:
    """What ``synth_svhn.json`` records (the easy level as before levels existed, so existing
    folders stay valid)."""
    meta = {"n_train": n_train, "n_test": n_test, "seed": seed, "version": 1}
    return meta if difficulty == "easy" else {**meta, "difficulty": difficulty}


def write_synth_svhn(root: str | Path, n_train: int = 6000, n_test: int = 2000,
                     seed: int = 0, difficulty: str = "easy") -> Path:
    """Render synthetic SVHN train and test splits into `root` as real SVHN `.mat` files.

    ``difficulty`` names a level of :data:`kron.data.synth_svhn.LEVELS` (easy, hard).
    """
    root = Path(root)
    level = synth_difficulty(difficulty)  # unknown names fail before anything is written
    for index, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        images, labels = render_split(n, seed, index, level)
        write_svhn(root, split, images.transpose(0, 3, 1, 2), labels)
    meta = _synth_meta(n_train, n_test, seed, difficulty)
    with atomic_path(root / SYNTH_META) as tmp:
        tmp.write_text(json.dumps(meta))
    return root


def ensure_synth_svhn(root: str | Path, n_train: int = 6000, n_test: int = 2000,
                      seed: int = 0, difficulty: str = "easy") -> Path:
    """Make sure `root` holds synthetic SVHN for these settings, rendering it if not.

    A small `synth_svhn.json` records the settings, so changing them regenerates the files.
    """
    root = Path(root)
    meta_path = root / SYNTH_META
    want = _synth_meta(n_train, n_test, seed, difficulty)
    files = [svhn_file(root, s) for s in ("train", "test")]
    if meta_path.is_file() and all(f.is_file() for f in files):
        try:
            if json.loads(meta_path.read_text()) == want:
                return root
        except json.JSONDecodeError:
            pass
    return write_synth_svhn(root, n_train, n_test, seed, difficulty)


def write_gnt(path: str | Path, records: Iterable[tuple[str | int, np.ndarray]]) -> Path:
    """Write a CASIA-HWDB `.gnt` from (character or 2-byte GB2312 code, (h, w) uint8 bitmap)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for char, bitmap in records:
            code = char_to_code(char) if isinstance(char, str) else int(char)
            f.write(encode_record(code, bitmap))
    return Path(path)


def random_gnt_records(n: int, seed: int = 0, max_side: int = 80,
                       num_classes: int | None = None) -> list[tuple[int, np.ndarray]]:
    """`n` records of class-dependent glyphs (`kron.data.synth_hwdb`), sides 8..`max_side`.

    Codes are drawn from all 3,755 level-1 characters, or balanced over the first
    `num_classes` of them (a learnable task: each class has its own stroke pattern).
    """
    return glyph_records(n, seed, num_classes, sides=(min(8, max_side), max_side))


def write_synth_hwdb(path: str | Path, n_train: int = 4000, n_test: int = 1000,
                     num_classes: int = 20, seed: int = 0, size: int = 64) -> Path:
    """Write a learnable synthetic HWDB as the converter would: HDF5 splits `train`, `test`.

    Both splits are rendered as real `.gnt` files (in a temporary folder) and converted with
    `--all-classes`, so the file's label table holds exactly `num_classes` characters (set
    `data.num_classes` to match) and labels are 0..num_classes-1. Train and test draw
    different samples of the same class patterns.
    """
    with tempfile.TemporaryDirectory() as tmp:
        for index, (split, n) in enumerate((("train", n_train), ("test", n_test))):
            sample_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
            gnt = write_gnt(Path(tmp) / f"{split}.gnt",
                            glyph_records(n, sample_seed, num_classes))
            convert_gnt([gnt], path, split, size=size, all_classes=True, progress=False)
    return Path(path)


def ensure_synth_hwdb(path: str | Path, n_train: int = 10000, n_test: int = 2000,
                      num_classes: int = 50, seed: int = 0, size: int = 64) -> Path:
    """Make sure HDF5 file `path` holds synthetic HWDB for these settings, writing it if not.

    The settings are recorded beside it (`<name>.json`), so changing them redraws the file.
    """
    path = Path(path)
    meta_path = path.with_suffix(".json")
    want = {"n_train": n_train, "n_test": n_test, "num_classes": num_classes, "seed": seed,
            "size": size, "version": SYNTH_HWDB_VERSION}
    if path.is_file() and meta_path.is_file():
        try:
            if json.loads(meta_path.read_text()) == want:
                return path
        except json.JSONDecodeError:
            pass
    write_synth_hwdb(path, n_train, n_test, num_classes, seed, size)
    with atomic_path(meta_path) as tmp:
        tmp.write_text(json.dumps(want))
    return path


def write_image(path: str | Path, image: np.ndarray) -> Path:
    """Write one uint8 image given as (H, W, 3) or (H, W); the format follows the extension."""
    path = Path(path)
    fmt = _PIL_FORMAT[path.suffix.lower().lstrip(".")]
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(tmp, format=fmt)
    return path


def write_icdar03(root: str | Path, samples: Sequence[tuple[np.ndarray, str]],
                  ext: str = "jpg") -> Path:
    """Write ICDAR 2003 character crops: `root/char/<k>/<i>.<ext>` and `root/char.xml`.

    `samples` are (uint8 (H, W, 3) image, tag); tags may include punctuation, which the loader
    drops, as in the real set.
    """
    root = Path(root)
    top = ET.Element("imagelist")
    for i, (image, tag) in enumerate(samples, start=1):
        rel = f"char/{(i - 1) // 1000 + 1}/{i}.{ext}"
        write_image(root / rel, image)
        ET.SubElement(top, "image", file=rel, tag=tag)
    with atomic_path(root / "char.xml") as tmp:
        ET.ElementTree(top).write(tmp, encoding="utf-8", xml_declaration=True)
    return root


def write_chars74k(root: str | Path, samples: Mapping[int, Sequence[np.ndarray]],
                   ext: str = "png") -> Path:
    """Write Chars74K English images: `root/English/Img/GoodImg/Bmp/SampleNNN/imgNNN-MMMMM`.

    `samples` maps a class index 0..61 (0-9, A-Z, a-z) to its images; all 62 folders are made.
    """
    base = Path(root) / CHARS74K_SUBDIR
    for k in range(62):
        folder = base / f"Sample{k + 1:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for j, image in enumerate(samples.get(k, ()), start=1):
            write_image(folder / f"img{k + 1:03d}-{j:05d}.{ext}", image)
    return Path(root)


def write_imagenet(root: str | Path, split: str, samples: Mapping[str, Sequence[np.ndarray]],
                   ext: str = "JPEG") -> Path:
    """Write ImageNet class folders `root/{split}/<wnid>/<wnid>_<i>.<ext>`."""
    for wnid, images in samples.items():
        for i, image in enumerate(images, start=1):
            write_image(Path(root) / split / wnid / f"{wnid}_{i}.{ext}", image)
    return Path(root)


def write_imagenet_flat_val(root: str | Path, devkit: str | Path,
                            samples: Sequence[tuple[np.ndarray, str]],
                            wnids: Sequence[str], ext: str = "JPEG") -> Path:
    """Write a flat `root/val/ILSVRC2012_val_%08d` folder and a devkit for it.

    The devkit has `data/meta.mat` (synsets: ILSVRC2012_ID 1.. for `wnids`, in order) and
    `data/ILSVRC2012_validation_ground_truth.txt` (one ID per image), as the real one.
    """
    ids = {w: i for i, w in enumerate(wnids, start=1)}
    for i, (image, _) in enumerate(samples, start=1):
        write_image(Path(root) / "val" / f"ILSVRC2012_val_{i:08d}.{ext}", image)
    data = Path(devkit) / "data"
    data.mkdir(parents=True, exist_ok=True)
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    synsets = np.array([(np.uint16(i), w, f"class {w}", np.uint16(0)) for w, i in ids.items()],
                       dtype=dtype)
    with atomic_path(data / "meta.mat") as tmp, open(tmp, "wb") as f:
        scipy.io.savemat(f, {"synsets": synsets})
    with atomic_path(data / "ILSVRC2012_validation_ground_truth.txt") as tmp:
        tmp.write_text("".join(f"{ids[w]}\n" for _, w in samples))
    return Path(root)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kron.data.synthetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("svhn", help="render synthetic SVHN as real SVHN .mat files")
    s.add_argument("--out", required=True, help="folder for train_32x32.mat and test_32x32.mat")
    s.add_argument("--n-train", type=int, default=6000)
    s.add_argument("--n-test", type=int, default=2000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--difficulty", default="easy", choices=sorted(LEVELS))
    g = sub.add_parser("gnt", help="write a .gnt of synthetic glyphs of level-1 characters")
    g.add_argument("--out", required=True)
    g.add_argument("--n", type=int, default=100)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--classes", type=int, default=None,
                   help="balance over the first K level-1 characters (default: all 3,755)")
    h = sub.add_parser("hwdb", help="write a learnable synthetic HWDB as converted HDF5")
    h.add_argument("--out", required=True, help="HDF5 file (splits train and test)")
    h.add_argument("--classes", type=int, default=20)
    h.add_argument("--n-train", type=int, default=4000)
    h.add_argument("--n-test", type=int, default=1000)
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--size", type=int, default=64)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.command == "svhn":
        write_synth_svhn(args.out, args.n_train, args.n_test, args.seed, args.difficulty)
        what = (f"{args.n_train} train + {args.n_test} test {args.difficulty} images into "
                f"{args.out}")
    elif args.command == "hwdb":
        write_synth_hwdb(args.out, args.n_train, args.n_test, args.classes, args.seed,
                         args.size)
        what = (f"{args.n_train} train + {args.n_test} test glyphs of {args.classes} classes "
                f"into {args.out}")
    else:
        write_gnt(args.out, random_gnt_records(args.n, args.seed, num_classes=args.classes))
        what = f"{args.n} records into {args.out}"
    print(f"wrote {what} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
