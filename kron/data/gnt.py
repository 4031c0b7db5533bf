"""The CASIA-HWDB `.gnt` record format, and the GB2312 level-1 label set.

A `.gnt` file is a plain sequence of records, each:
`uint32 LE size (= 10 + w*h)`, 2 bytes tag code (GB2312, big-endian), `uint16 LE width`,
`uint16 LE height`, then `w*h` uint8 greyscale pixels, row-major, background 255.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import DatasetError

HEADER = struct.Struct("<I2sHH")  # size, tag code, width, height: 10 bytes
LEVEL1_FIRST, LEVEL1_LAST = 0xB0A1, 0xD7F9
_ROW_LEN = 94  # GB2312 rows hold 94 characters, second byte 0xA1..0xFE


class GntError(DatasetError):
    """A truncated or malformed `.gnt` record; carries the file and the record's byte offset."""

    def __init__(self, path: str | Path, offset: int, problem: str) -> None:
        self.path, self.offset, self.problem = Path(path), offset, problem
        super().__init__(
            f"CASIA-HWDB: corrupt record in {path} at byte offset {offset}: {problem}. "
            "Re-extract the .gnt file, or pass --skip-corrupt to skip bad records "
            "(see data/README.md)."
        )


@dataclass(frozen=True)
class GntRecord:
    """One handwritten character: its 2-byte GB2312 code and its (h, w) uint8 bitmap."""

    code: int
    bitmap: np.ndarray
    offset: int

    @property
    def char(self) -> str:
        return code_to_char(self.code)


def code_to_char(code: int) -> str:
    """The character of a 2-byte GB2312 code, or `<0xABCD>` when it is not valid GB2312."""
    try:
        return code.to_bytes(2, "big").decode("gb2312")
    except UnicodeDecodeError:
        return f"<0x{code:04X}>"


def level1_label(code: int) -> int | None:
    """Label of `code` among the 3,755 GB2312 level-1 characters (code order), else None."""
    hi, lo = code >> 8, code & 0xFF
    if not (LEVEL1_FIRST <= code <= LEVEL1_LAST and 0xA1 <= lo <= 0xFE):
        return None
    return (hi - 0xB0) * _ROW_LEN + (lo - 0xA1)


def level1_codes() -> np.ndarray:
    """The 3,755 level-1 codes in label order (uint16): label -> GB2312 code."""
    codes = [
        (hi << 8) | lo
        for hi in range(0xB0, 0xD8)
        for lo in range(0xA1, 0xFF)
        if (hi << 8) | lo <= LEVEL1_LAST
    ]
    return np.asarray(codes, dtype=np.uint16)


def char_to_code(char: str) -> int:
    """The 2-byte GB2312 code of one character (raises for characters outside GB2312)."""
    raw = char.encode("gb2312")
    if len(raw) != 2:
        raise ValueError(f"{char!r} is not a double-byte GB2312 character")
    return int.from_bytes(raw, "big")


def read_records(
    f: BinaryIO, path: str | Path, size: int, skip_corrupt: bool = False
) -> Iterator[GntRecord | GntError]:
    """Stream the records of an open `.gnt` file of `size` bytes.

    A malformed record raises `GntError`, or with `skip_corrupt` is yielded as the error (so
    the caller can count it) and reading resumes after it when its size field is usable, or
    stops at a truncated tail.
    """
    offset = 0
    while offset < size:
        head = f.read(HEADER.size)
        problem, skip_to = None, None
        if len(head) < HEADER.size:
            problem = f"truncated header ({len(head)} of {HEADER.size} bytes)"
        else:
            rec_size, tag, w, h = HEADER.unpack(head)
            if rec_size != HEADER.size + w * h:
                problem = f"size field {rec_size} != 10 + {w}*{h}"
                if HEADER.size <= rec_size <= size - offset:
                    skip_to = offset + rec_size
            elif w == 0 or h == 0:
                problem, skip_to = f"empty {w}x{h} bitmap", offset + rec_size
            elif offset + rec_size > size:
                problem = f"truncated bitmap ({size - offset - HEADER.size} of {w * h} bytes)"
        if problem is None:
            pixels = f.read(w * h)
            code = int.from_bytes(tag, "big")
            yield GntRecord(code, np.frombuffer(pixels, np.uint8).reshape(h, w), offset)
            offset += rec_size
            continue
        err = GntError(path, offset, problem)
        if not skip_corrupt:
            raise err
        yield err
        if skip_to is None:
            return
        f.seek(skip_to)
        offset = skip_to


def iter_gnt(path: str | Path, skip_corrupt: bool = False) -> Iterator[GntRecord | GntError]:
    """Stream the records of the `.gnt` file at `path` (see `read_records`)."""
    path = Path(path)
    with open(path, "rb") as f:
        yield from read_records(f, path, path.stat().st_size, skip_corrupt)


def encode_record(code: int, bitmap: np.ndarray) -> bytes:
    """Bytes of one record for a 2-byte `code` and an (h, w) uint8 `bitmap`."""
    bitmap = np.ascontiguousarray(bitmap, dtype=np.uint8)
    h, w = bitmap.shape
    return HEADER.pack(HEADER.size + w * h, code.to_bytes(2, "big"), w, h) + bitmap.tobytes()


def encode_records(records: Iterable[tuple[int, np.ndarray]]) -> Iterator[bytes]:
    """Bytes of many records, for writers that stream them to a file."""
    for code, bitmap in records:
        yield encode_record(code, bitmap)
