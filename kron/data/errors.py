"""The one exception kron's data code raises at users, and helpers that phrase it.

Every problem with data on disk (missing, corrupt, wrong format) becomes a `DatasetError` whose
message is one line: what is wrong, which file, and what to do about it. Lower-level exceptions
(scipy, h5py, PIL, torch) are summarised into that line rather than shown as tracebacks.
"""

from __future__ import annotations

from pathlib import Path

README = "data/README.md"


class DatasetError(ValueError):
    """A dataset is missing, corrupt or in the wrong format; the message says how to fix it."""


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
