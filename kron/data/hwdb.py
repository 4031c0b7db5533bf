"""CASIA-HWDB handwritten Chinese characters: the `.gnt` -> HDF5 converter and the loader.

HDF5 layout (one group per split, any number of splits per file):
`/{split}/x` uint8 (N, 1, S, S), background 255; `/{split}/y` int64 (N,);
`/{split}/codes` uint16 (K,), label -> GB2312 code; `/{split}/chars` (K,) UTF-8 strings;
attribute `label_set`: `gb2312-level1` (the standard 3,755 classes, label = position in code
order) or `all` (every code seen, sorted; shared by all `all` splits of the file).

Command line:
`python -m kron.data.hwdb convert --split NAME --out FILE.h5 [--size S] GNT_FILE_OR_DIR...`
`python -m kron.data.hwdb info FILE.h5`
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from kron.fileio import atomic_path

from .errors import DatasetError, corrupt, missing
from .gnt import GntError, code_to_char, iter_gnt, level1_codes, level1_label

LEVEL1, ALL = "gb2312-level1", "all"
WHAT = "CASIA-HWDB"
CONVERT_HINT = (
    "Download the CASIA-HWDB .gnt archives and convert them with "
    "`python -m kron.data.hwdb convert --split train --out {path} GNT_DIR`"
)


def normalise(bitmap: np.ndarray, size: int) -> np.ndarray:
    """Pad an (h, w) bitmap to a centred square with background 255, then resize to size x size.

    Keeps the aspect ratio; a bitmap that already is size x size is returned unchanged.
    """
    h, w = bitmap.shape
    side = max(h, w)
    if side != h or side != w:
        square = np.full((side, side), 255, dtype=np.uint8)
        top, left = (side - h) // 2, (side - w) // 2
        square[top : top + h, left : left + w] = bitmap
        bitmap = square
    if side != size:
        img = Image.fromarray(bitmap, mode="L").resize((size, size), Image.Resampling.BILINEAR)
        bitmap = np.asarray(img)
    return bitmap


def find_gnt_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders (searched recursively, sorted) into the list of `.gnt` files."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix.lower() == ".gnt" and q.is_file())
            if not found:
                raise missing(WHAT, p / "*.gnt", "Extract the HWDB .gnt archives into it")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise missing(WHAT, p, "Give existing .gnt files or folders holding them")
    return files


@dataclass
class ConvertStats:
    """What a conversion kept and dropped; byte ranges are (file, start, end) with end
    exclusive."""

    written: int = 0
    dropped_classes: int = 0  # records outside the kept label set
    skipped: list[tuple[str, int, int]] = field(default_factory=list)  # corrupt, resynced past
    unread: list[tuple[str, int, int]] = field(default_factory=list)  # no header after a bad one
    files: list[str] = field(default_factory=list)

    @property
    def skipped_corrupt(self) -> int:
        """How many corrupt stretches were skipped (each one bad record, or several in a row)."""
        return len(self.skipped)

    def note(self, err: GntError, size: int) -> None:
        """Count a corrupt record that `read_records` yielded (with `skip_corrupt`)."""
        if err.resume is None:
            self.unread.append((str(err.path), err.offset, size))
        else:
            self.skipped.append((str(err.path), err.offset, err.resume))


def describe(ranges: list[tuple[str, int, int]], limit: int = 5) -> str:
    """`a.gnt bytes 266-532, ...` for the first `limit` byte ranges (end exclusive)."""
    parts = [f"{os.path.basename(f)} bytes {a}-{b}" for f, a, b in ranges[:limit]]
    more = len(ranges) - limit
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


def convert(
    inputs: Sequence[str | Path],
    out: str | Path,
    split: str,
    size: int = 64,
    all_classes: bool = False,
    skip_corrupt: bool = False,
    progress: bool = True,
    compression: str | None = None,
    block: int = 1024,
) -> ConvertStats:
    """Stream `.gnt` files into group `split` of HDF5 file `out` (added, or replaced if present).

    Writes a temporary file beside `out` (copying the other splits of an existing `out`) and
    renames it into place at the end, so `out` is never half-written. Images are stored one
    per HDF5 chunk (fast random reads); `compression="gzip"` shrinks them at some read cost.
    """
    if not split or "/" in split:
        raise DatasetError(f"{WHAT}: bad split name {split!r}; use a plain name like train.")
    if size < 1:
        raise DatasetError(f"{WHAT}: --size must be positive, got {size}.")
    files = find_gnt_files(inputs)
    out = Path(out)
    stats = ConvertStats(files=[str(f) for f in files])
    total = sum(f.stat().st_size for f in files)
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as dst:
        if out.exists():
            _copy_other_splits(out, dst, split)
        grp = dst.create_group(split)
        x = grp.create_dataset(
            "x", shape=(0, 1, size, size), maxshape=(None, 1, size, size), dtype=np.uint8,
            chunks=(1, 1, size, size), compression=compression,
        )
        with tqdm(total=total, unit="B", unit_scale=True, desc=split,
                  disable=not progress) as bar:
            images = _kept_images(files, stats, size, all_classes, skip_corrupt, bar.update)
            codes = _append(x, images, block)
        stats.written = x.shape[0]
        _write_labels(dst, split, np.asarray(codes, dtype=np.int64), all_classes)
        grp.attrs["size"] = size
        grp.attrs["sources"] = [os.path.basename(f) for f in stats.files]
        grp.attrs["skipped_corrupt"] = stats.skipped_corrupt
        grp.attrs["unread_bytes"] = sum(b - a for _, a, b in stats.unread)
        grp.attrs["dropped_classes"] = stats.dropped_classes
    return stats


def _kept_images(files: list[Path], stats: ConvertStats, size: int, all_classes: bool,
                 skip_corrupt: bool, advance: Callable[[int], object]
                 ) -> Iterator[tuple[int, np.ndarray]]:
    """(code, normalised image) of every kept record of `files`; counts the rest in `stats`.

    `advance(n)` is told how many more bytes were read (the progress bar).
    """
    for path in files:
        done, file_size = 0, path.stat().st_size
        for rec in iter_gnt(path, skip_corrupt):
            if isinstance(rec, GntError):
                stats.note(rec, file_size)
                continue
            advance(rec.offset - done)
            done = rec.offset
            if not all_classes and level1_label(rec.code) is None:
                stats.dropped_classes += 1
                continue
            yield rec.code, normalise(rec.bitmap, size)
        advance(file_size - done)


def _append(x: h5py.Dataset, images: Iterable[tuple[int, np.ndarray]], block: int) -> list[int]:
    """Append the images to the resizable dataset `x`, `block` at a time; return their codes."""
    codes: list[int] = []
    buf: list[np.ndarray] = []
    for code, image in images:
        codes.append(code)
        buf.append(image)
        if len(buf) >= block:
            _flush(x, buf)
    _flush(x, buf)
    return codes


def _flush(x: h5py.Dataset, buf: list[np.ndarray]) -> None:
    if buf:
        n = x.shape[0]
        x.resize(n + len(buf), axis=0)
        x[n:] = np.stack(buf)[:, None]
        buf.clear()


def _copy_other_splits(out: Path, dst: h5py.File, split: str) -> None:
    try:
        with h5py.File(out, "r") as src:
            for name in src:
                if name != split:
                    src.copy(src[name], dst, name=name)
            for key, value in src.attrs.items():
                dst.attrs[key] = value
    except OSError as err:
        raise corrupt(WHAT, out, err, "Delete it or give a new --out path") from None


def _write_labels(dst: h5py.File, split: str, codes: np.ndarray, all_classes: bool) -> None:
    """Write y and the label table of `split`; `all` splits of the file share one table."""
    if not all_classes:
        table = level1_codes().astype(np.int64)
        _store(dst[split], np.searchsorted(table, codes), table, LEVEL1)
        return
    others = [n for n in dst if n != split and dst[n].attrs.get("label_set") == ALL]
    old = {n: dst[n]["codes"][:].astype(np.int64) for n in others}
    table = np.unique(np.concatenate([codes, *old.values()]))
    for name in others:
        y = old[name][dst[name]["y"][:]]  # labels -> codes under the old table
        for key in ("y", "codes", "chars"):
            del dst[name][key]
        _store(dst[name], np.searchsorted(table, y), table, ALL)
    _store(dst[split], np.searchsorted(table, codes), table, ALL)


def _store(grp: h5py.Group, y: np.ndarray, table: np.ndarray, label_set: str) -> None:
    grp.create_dataset("y", data=y.astype(np.int64))
    grp.create_dataset("codes", data=table.astype(np.uint16))
    chars = [code_to_char(int(c)) for c in table]
    grp.create_dataset("chars", data=chars, dtype=h5py.string_dtype("utf-8"))
    grp.attrs["label_set"] = label_set


class HWDB(Dataset):
    """One split of a converted CASIA-HWDB HDF5 file; items are (uint8 (1, S, S), label).

    `.classes[label]` is the character; `.codes[label]` its GB2312 code. The file is opened
    lazily, once per process, so each DataLoader worker gets its own h5py handle (handles must
    not cross a fork).
    """

    def __init__(
        self, path: str | Path, split: str = "train", transform: Callable | None = None
    ) -> None:
        self.path, self.split, self.transform = Path(path), split, transform
        if not self.path.is_file():
            raise missing(WHAT, self.path, CONVERT_HINT.format(path=self.path))
        try:
            with h5py.File(self.path, "r") as f:
                if split not in f:
                    raise DatasetError(
                        f"{WHAT}: {self.path} has no split {split!r} (it has "
                        f"{sorted(f.keys())}). Add it with `python -m kron.data.hwdb convert "
                        f"--split {split} --out {self.path} GNT_DIR` (see data/README.md)."
                    )
                grp = f[split]
                x = grp["x"]
                self.targets = torch.from_numpy(grp["y"][:].astype(np.int64))
                self.codes = grp["codes"][:].astype(np.int64).tolist()
                self.label_set = str(grp.attrs.get("label_set", LEVEL1))
                shape, dtype = x.shape, x.dtype
        except DatasetError:
            raise
        except (OSError, KeyError, ValueError) as err:
            raise corrupt(WHAT, self.path, err, "Re-run the converter") from None
        if len(shape) != 4 or shape[1] != 1 or shape[2] != shape[3] or dtype != np.uint8:
            raise corrupt(WHAT, self.path, f"/{split}/x is {dtype} {shape}, not uint8 (N,1,S,S)")
        if shape[0] != len(self.targets):
            raise corrupt(WHAT, self.path, f"{shape[0]} images but {len(self.targets)} labels")
        bad = torch.nonzero((self.targets < 0) | (self.targets >= len(self.codes)))
        if len(bad):
            i = int(bad[0])
            raise corrupt(WHAT, self.path, f"label {int(self.targets[i])} of image {i} in "
                          f"/{split}/y is outside 0..{len(self.codes) - 1}, the stored label "
                          f"table ({len(bad)} such labels)", "Re-run the converter")
        self.classes = [code_to_char(c) for c in self.codes]
        self.size = shape[2]
        self._file: h5py.File | None = None
        self._x: h5py.Dataset | None = None
        self._pid: int | None = None

    def _images(self) -> h5py.Dataset:
        if self._x is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._x = self._file[self.split]["x"]
            self._pid = os.getpid()
        return self._x

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"], state["_x"], state["_pid"] = None, None, None
        return state

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            img = torch.from_numpy(self._images()[index])
        except (OSError, KeyError) as err:
            raise corrupt(WHAT, self.path, err, "Re-run the converter") from None
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])


def info(path: str | Path) -> str:
    """One line per split: count, image size, label set and class count."""
    lines = []
    for name in _splits(path):
        ds = HWDB(path, name)
        lines.append(
            f"{name}: {len(ds)} images {ds.size}x{ds.size}, label set {ds.label_set}, "
            f"{len(ds.classes)} classes"
        )
    return "\n".join(lines)


def _splits(path: str | Path) -> list[str]:
    if not Path(path).is_file():
        raise missing(WHAT, path, CONVERT_HINT.format(path=path))
    try:
        with h5py.File(path, "r") as f:
            return sorted(f.keys())
    except OSError as err:
        raise corrupt(WHAT, path, err, "Re-run the converter") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kron.data.hwdb", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert .gnt files into one split of an HDF5 file")
    c.add_argument("--split", required=True, help="group name, e.g. train or test")
    c.add_argument("--out", required=True, help="HDF5 file to create or update")
    c.add_argument("--size", type=int, default=64, help="side of the square images (64)")
    c.add_argument("--all-classes", action="store_true",
                   help="keep every tag code, not only the 3,755 GB2312 level-1 characters")
    c.add_argument("--skip-corrupt", action="store_true",
                   help="skip malformed records and go on at the next valid record header; "
                   "the summary gives their byte offsets, and the exit status is 3 if bytes "
                   "were left unread (no valid header after a bad record)")
    c.add_argument("--compression", choices=("gzip", "lzf"), default=None,
                   help="compress the images (smaller file, slower reads); default none")
    c.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    c.add_argument("inputs", nargs="+", metavar="GNT_FILE_OR_DIR")
    i = sub.add_parser("info", help="describe the splits of a converted HDF5 file")
    i.add_argument("path")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            print(info(args.path))
            return 0
        stats = convert(args.inputs, args.out, args.split, args.size, args.all_classes,
                        args.skip_corrupt, progress=not args.no_progress,
                        compression=args.compression)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the output folder: read-only, full disk, ...
        print(f"error: {WHAT}: cannot write {err.filename or args.out} ({err.strerror or err}); "
              "choose a writable --out with free space.", file=sys.stderr)
        return 2
    print(report(stats, f"{args.out}:/{args.split}"))
    if stats.unread:
        print(f"error: {WHAT}: {sum(b - a for _, a, b in stats.unread)} bytes left unread "
              f"after a corrupt record with no valid record header after it "
              f"({describe(stats.unread)}); the records there are not in {args.out}. "
              "Re-extract those .gnt files (see data/README.md).", file=sys.stderr)
        return 3
    return 0


def report(stats: ConvertStats, where: str) -> str:
    """The converter's one-line summary: written, dropped, skipped and unread, with offsets."""
    line = (f"{where}: wrote {stats.written} images from {len(stats.files)} files; dropped "
            f"{stats.dropped_classes} outside the label set; skipped {stats.skipped_corrupt} "
            "corrupt records")
    if stats.skipped:
        line += f" ({describe(stats.skipped)})"
    unread = sum(b - a for _, a, b in stats.unread)
    return line + f"; left {unread} bytes unread" + (f" ({describe(stats.unread)})"
                                                     if unread else "")

if __name__ == "__main__":
    sys.exit(main())
