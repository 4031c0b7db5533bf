"""kron's own exception types: a mistake a user can fix, told in one line.

Every type here carries a message that names the path or key at fault and the fix. The
entrypoints (``kron.train``, ``kron-tables``) catch these, the data errors
(:class:`kron.data.errors.DatasetError`) and the layers' refusal
(:class:`kron.layers.errors.FactorizationError`) and print the message as one line on stderr
with a non-zero exit; ``HYDRA_FULL_ERROR=1`` or ``KRON_DEBUG=1`` shows the traceback instead.
See docs/design.md, D6 and D8.
"""

from __future__ import annotations

import os


class KronError(Exception):
    """Base of kron's user-facing errors (message: one line naming the problem and the fix)."""


class ConfigError(KronError, ValueError):
    """A config value of the wrong type or out of range, or a key nothing reads."""


class CheckpointError(KronError):
    """A checkpoint that cannot be read, or that belongs to another run than this one."""


class OutputFolderError(KronError, OSError):
    """A run folder that cannot be used: in use by a live job, read-only, or out of space.

    Also an ``OSError``, so callers that handled a failed write keep handling it.
    """

    def __str__(self) -> str:  # OSError's own __str__ would add "[Errno ...]" pieces
        return str(self.args[0]) if self.args else ""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types an entrypoint reports as one line (imported lazily: the data and
    layers packages pull in torch)."""
    from kron.data.errors import DatasetError
    from kron.layers.errors import FactorizationError

    return KronError, DatasetError, FactorizationError


def debug_wanted() -> bool:
    """Whether the user asked for tracebacks (``HYDRA_FULL_ERROR=1`` or ``KRON_DEBUG=1``)."""
    return any(os.environ.get(k, "") not in ("", "0") for k in ("HYDRA_FULL_ERROR", "KRON_DEBUG"))


def one_line(err: BaseException) -> str:
    """``err``'s message on one line (whitespace runs folded)."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(text.split()) or type(err).__name__
