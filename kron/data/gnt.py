"""The CASIA-HWDB `.gnt` record format, and the GB2312 level-1 label set.

A `.gnt` file is a plain sequence of records, each:
`uint32 LE size (= 10 + w*h)`, 2 bytes tag code (GB2312, big-endian), `uint16 LE width`,
`uint16 LE height`, then `w*h` uint8 greyscale pixels, row-major, background 255.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import DatasetError

HEADER = struct.Struct("<I2sHH")  # size, tag code, width, height: 10 bytes
LEVEL1_FIRST, LEVEL1_LAST = 0xB0A1, 0xD7F9
_ROW_LEN = 94  # GB2312 rows hold 94 characters, second byte 0xA1..0xFE
MAX_SIDE = 1024  # largest bitmap side a resynchronisation accepts (HWDB characters: < 400)


class GntError(DatasetError):
    """A truncated or malformed `.gnt` record; carries the file and the record's byte offset.

    With `skip_corrupt`, `resume` is where reading went on: the next plausible record header
    (`find_header`), the file's size when the bad record was its last, or None when no header
    follows, so the bytes from `offset` to the end were left unread.
    """

    def __init__(self, path: str | Path, offset: int, problem: str,
                 resume: int | None = None) -> None:
        self.path, self.offset, self.problem, self.resume = Path(path), offset, problem, resume
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
    the caller can count it) and reading resumes at the next plausible header after it
    (`find_header`), found by scanning forward byte by byte; `GntError.resume` says where,
    or is None when none follows (the rest of the file is left unread and reading stops).
    """
    offset = 0
    while offset < size:
        f.seek(offset)
        head = f.read(HEADER.size)
        problem, tail = _problem(head, offset, size)
        if problem is None:
            rec_size, tag, w, h = HEADER.unpack(head)
            pixels = f.read(w * h)
            code = int.from_bytes(tag, "big")
            yield GntRecord(code, np.frombuffer(pixels, np.uint8).reshape(h, w), offset)
            offset += rec_size
            continue
        resume = size if tail else find_header(f, offset + 1, size)
        err = GntError(path, offset, problem, resume)
        if not skip_corrupt:
            raise err
        yield err
        if resume is None:
            return
        offset = resume


def _problem(head: bytes, offset: int, size: int) -> tuple[str | None, bool]:
    """What is wrong with the record whose header is `head` (None if nothing), and whether it
    is a well-formed header cut short by the end of the file (nothing can follow it)."""
    if len(head) < HEADER.size:
        return f"truncated header ({len(head)} of {HEADER.size} bytes)", True
    rec_size, _, w, h = HEADER.unpack(head)
    if rec_size != HEADER.size + w * h:
        return f"size field {rec_size} != 10 + {w}*{h}", False
    if w == 0 or h == 0:
        return f"empty {w}x{h} bitmap", False
    if offset + rec_size > size:
        return f"truncated bitmap ({size - offset - HEADER.size} of {w * h} bytes)", True
    return None, False


def plausible_header(head: bytes, offset: int, size: int, max_side: int = MAX_SIDE) -> bool:
    """Whether `head`, read at `offset` of a `size`-byte file, looks like a real record header.

    Size field equal to 10 + w*h, 1 <= w, h <= `max_side`, both tag bytes in the GB2312
    double-byte range 0xA1..0xFE, and the record ends within the file.
    """
    if len(head) < HEADER.size:
        return False
    rec_size, tag, w, h = HEADER.unpack(head)
    return (rec_size == HEADER.size + w * h and 1 <= w <= max_side and 1 <= h <= max_side
            and all(0xA1 <= b <= 0xFE for b in tag) and offset + rec_size <= size)


def find_header(f: BinaryIO, start: int, size: int, chunk: int = 1 << 20) -> int | None:
    """The first offset >= `start` holding a plausible header whose record is followed by
    another plausible header or by the end of the file; None if there is none.

    Scans `chunk` bytes at a time (vectorised pre-filter on the size field, then the full
    check on each candidate), so a resynchronisation over a large file stays fast.
    """
    pos = start
    while pos + HEADER.size <= size:
        f.seek(pos)
        buf = np.frombuffer(f.read(chunk + HEADER.size - 1), np.uint8).astype(np.int64)
        n = len(buf) - HEADER.size + 1
        field = buf[:n] | buf[1 : n + 1] << 8 | buf[2 : n + 2] << 16 | buf[3 : n + 3] << 24
        w, h = buf[6 : n + 6] | buf[7 : n + 7] << 8, buf[8 : n + 8] | buf[9 : n + 9] << 8
        for i in np.flatnonzero((field == HEADER.size + w * h) & (w > 0) & (h > 0)):
            cand = pos + int(i)
            if _header_at(f, cand, size) and _followed(f, cand, size):
                return cand
        pos += n
    return None


def _header_at(f: BinaryIO, offset: int, size: int) -> bool:
    f.seek(offset)
    return plausible_header(f.read(HEADER.size), offset, size)


def _followed(f: BinaryIO, offset: int, size: int) -> bool:
    """Whether the record at `offset` ends at the end of the file or before another header."""
    f.seek(offset)
    end = offset + HEADER.unpack(f.read(HEADER.size))[0]
    return end == size or _header_at(f, end, size)


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
