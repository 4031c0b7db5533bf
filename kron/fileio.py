"""File helpers shared by every writer in kron (datasets, converter, checkpoints, results,
tables, plots): durable atomic writes, so that a crash, a power cut or a parallel reader never
sees a half-written file; removal of the temporary files a killed writer left; and MD5."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from kron.errors import OutputFolderError

TMP_SUFFIX = ".tmp"
#: errno values that mean "this folder cannot take the write" rather than a bug
DISK_ERRNOS = {errno.ENOSPC: "no space left on the device",
               errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "the file system is read-only",
               errno.EACCES: "permission denied",
               errno.EPERM: "permission denied"}


SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def disk_error(dest: str | Path, err: OSError, space_only: bool = False
               ) -> OutputFolderError | None:
    """One-line :class:`~kron.errors.OutputFolderError` for a write that failed because the
    folder is full or not writable (only full, with ``space_only``); None for any other
    OSError."""
    why = DISK_ERRNOS.get(err.errno or 0)
    if why is None or (space_only and err.errno not in SPACE_ERRNOS):
        return None
    fix = ("free some space or write elsewhere" if err.errno in SPACE_ERRNOS
           else "make the folder writable or write elsewhere")
    return OutputFolderError(f"cannot write {dest}: {why} ({fix}, e.g. hydra.run.dir=...)")


def fsync_folder(folder: str | Path) -> None:
    """Make a rename or a new file in ``folder`` survive a power cut (no-op where folders
    cannot be opened, e.g. on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not fsync folders
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(dest: str | Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to `dest`; on success make it durable and rename it onto
    `dest`.

    The temporary file (``.<name>.<random>.tmp``) lives in the same folder so `os.replace` is
    an atomic rename; it is fsynced before the rename and the folder after, so after a crash
    `dest` holds the old or the new content, never a torn one. On any exception it is removed.
    A full disk or a read-only folder raises :class:`~kron.errors.OutputFolderError` naming
    `dest`. ``durable=False`` skips the two fsyncs (for files that are cheap to make again).
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=TMP_SUFFIX, dir=dest.parent)
    except OSError as err:
        raise disk_error(dest, err) or err from None
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
    try:
        try:
            yield tmp_path
        except OSError as err:  # the caller's write: a full disk is ours to name, not more
            raise disk_error(dest, err, space_only=True) or err from None
        try:
            if durable:
                _fsync_file(tmp_path)
            os.replace(tmp_path, dest)
        except OSError as err:
            raise disk_error(dest, err) or err from None
        if durable:
            fsync_folder(dest.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Create ``path`` by calling ``write(tmp_path)`` and renaming the result into place."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_stream(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Like :func:`atomic_write`, but ``write`` gets an open binary file: errors of the write
    itself (a full disk) then surface as ``OSError`` with its errno, which writers that take a
    path (``torch.save``) turn into errno-less messages."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    return atomic_write(path, lambda t: t.write_text(text, encoding="utf-8"))


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temporary files (``.<name>.*.tmp``) that killed writers left in ``folder``.

    Call it only while holding the folder (its run marker): then no live writer owns them.
    Returns the files removed.
    """
    removed = []
    for p in Path(folder).glob(f".*{TMP_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def md5sum(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex MD5 of a file, read in 1 MiB chunks so large files do not fill memory."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
