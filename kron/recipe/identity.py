"""Which run a checkpoint belongs to: the config keys that must match to resume it.

A checkpoint stores its run's resolved config and ``config_hash``, the hash of
:func:`identity`: the config as the tables compare it to decide whether a record is current
(:func:`kron.tables.run.comparable_config`, reused, not copied: data loading, resume, progress and
logging aside), less what only says when the run stops, where it runs and what it reports
(``IGNORED``). The optimizer is part of it. ``resume`` compares the config inside the
checkpoint with this run's and names the first key that differs. See docs/design.md, D6
and D8.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from kron.tables.run import comparable_config as tables_comparable

#: top-level keys a resumed run may change: when it stops, where it runs, what it reports
IGNORED = ("stop_after_epochs", "resume_force", "device", "threads", "eval_batch_size",
           "measure", "wandb")


def identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a resolved config (plain dict) that must match for a resume."""
    view = tables_comparable(dict(config))
    for key in IGNORED:
        view.pop(key, None)
    return view


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 of :func:`identity` (stable: sorted keys, JSON)."""
    text = json.dumps(identity(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of nested mappings by dotted key (an empty mapping has none)."""
    if not isinstance(d, Mapping):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


_ABSENT = object()


def _show(v: Any) -> str:
    return "(absent)" if v is _ABSENT else json.dumps(v, default=str)


def first_difference(saved: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
    """The first identity key whose value differs between two resolved configs, phrased as
    ``key=<saved> in the checkpoint, <now> here``; None when they match."""
    a, b = _flat(identity(saved)), _flat(identity(now))
    for key in [*b, *(k for k in a if k not in b)]:
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if va != vb:
            return f"{key}={_show(va)} in the checkpoint, {_show(vb)} here"
    return None
