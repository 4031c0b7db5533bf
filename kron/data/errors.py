"""The exceptions kron's data code raises at users, and helpers that phrase them.

Every problem with data on disk (missing, corrupt, wrong format) becomes a `DatasetError` whose
message is one line: what is wrong, which file, and what to do about it. Lower-level exceptions
(scipy, h5py, PIL, torch) are summarised into that line rather than shown as tracebacks.
Subclasses (all caught by `except DatasetError`): `UnsafePathError` here, for a name in a data
file that would lead outside its dataset root, and `kron.data.gnt.GntError`, a corrupt `.gnt`
record.
"""

from __future__ import annotations

import os
from pathlib import Path

README = "data/README.md"


class DatasetError(ValueError):
    """A dataset is missing, corrupt or in the wrong format; the message says how to fix it."""


class UnsafePathError(DatasetError):
    """A path or folder name read from a data file would lead outside its dataset root."""


def inside(root: str | Path, name: str, what: str, source: str | Path,
           single: bool = False) -> Path:
    """`root / name` for a `name` read from the data file `source`, refusing any escape.

    The join is normalised lexically (`..` folded, an absolute `name` kept absolute), and the
    result must lie strictly below `root`; with `single` it must be a direct child (a folder
    name such as a WordNet id). Symlinks are not followed: links the user made inside a root
    are trusted, names written in a downloaded file are not. An escape raises
    `UnsafePathError` naming the entry and the file.
    """
    base = os.path.normpath(os.path.abspath(root))
    target = os.path.normpath(os.path.join(base, name)) if "\0" not in name else ""
    parent = os.path.dirname(target)
    ok = target != base and os.path.commonpath([base, target or "/"]) == base
    if not ok or (single and parent != base):
        kind = "a plain name" if single else "a relative path"
        raise UnsafePathError(
            f"{what}: entry {name!r} in {source} would lead outside {base}; each entry must be "
            f"{kind} inside that folder. The file is damaged or hostile: re-download it "
            f"(see {README})."
        )
    return Path(target)


def missing(what: str, path: str | Path, how: str) -> DatasetError:
    """Error for an expected file or folder that is not there.

    `how` says how to obtain it; the README section is appended so every message points at
    the one place that documents each dataset.
    """
    return DatasetError(f"{what}: expected {path} but it does not exist. {how} (see {README}).")


def corrupt(
    what: str, path: str | Path, detail: str | BaseException, fix: str = ""
) -> DatasetError:
    """Error for a file that exists but cannot be read as the format it should be in."""
    if isinstance(detail, BaseException):
        detail = f"{type(detail).__name__}: {_one_line(str(detail))}"
    fix = fix or "Re-download or regenerate it"
    return DatasetError(f"{what}: cannot read {path} ({detail}). {fix} (see {README}).")


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
