"""Old names in run records, mapped to today's (docs/notes/names.md).

A committed ``results.json`` keeps the names of the code that wrote it: its overrides may say
``experiment=svhn_table/dense`` (the Hydra group is ``preset`` now), a Kronecker layer's
implementation ``dense`` (now ``composed``), and its executed MAC count sits under ``macs`` (now
``macs_executed``). Renaming must not make such a record stale or unreadable, so the tables read
every record through this one module: :func:`override` and :func:`config` before comparing a
record with what the configs compose to now (kron/tables/run.py), :func:`results` before
rendering one (kron/tables/results.py).
"""

from __future__ import annotations

import copy
from typing import Any

# renamed values of a Kronecker layer's ``implementation`` (top level or in a layer spec): the
# layers' own table of old names, so a record and a constructor read them alike
from kron.layers.kron_base import implementation_name

#: renamed Hydra config groups and keys of an override (``+`` and ``~`` prefixes kept apart
#: from the name); ``+experiment`` selected the same preset as ``experiment``
OVERRIDE_KEYS = {"experiment": "preset", "+experiment": "preset"}
#: renamed top-level keys of a run's composed config (dotted paths; none yet)
CONFIG_KEYS: dict[str, str] = {}
#: renamed fields of results.json (the old name is read only when the new one is absent)
RESULT_KEYS = {"macs": "macs_executed"}


def implementation(value: Any) -> Any:
    """Today's name of a Kronecker layer implementation (other values unchanged)."""
    return implementation_name(value) if isinstance(value, str) else value


def override(key: str, value: Any) -> tuple[str, Any]:
    """(key, value) of one parsed override under today's names."""
    key = OVERRIDE_KEYS.get(key, key)
    if key.lstrip("+~") == "implementation" or key.endswith(".implementation"):
        value = implementation(value)
    return key, value


def _layer_specs(layers: Any) -> None:
    for spec in (layers.values() if isinstance(layers, dict) else ()):
        if isinstance(spec, dict) and "implementation" in spec:
            spec["implementation"] = implementation(spec["implementation"])


def _move(cfg: dict[str, Any], old: str, new: str) -> None:
    """Move the value at dotted path ``old`` to dotted path ``new`` (if ``old`` is there)."""
    *path, last = old.split(".")
    node: Any = cfg
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or last not in node:
        return
    value = node.pop(last)
    *path, last = new.split(".")
    for part in path:
        cfg = cfg.setdefault(part, {})
    cfg[last] = value


def config(recorded: dict[str, Any], keys: dict[str, str] | None = None) -> dict[str, Any]:
    """A copy of a run's recorded config under today's names: keys moved by ``keys`` (dotted
    old path -> new path; default :data:`CONFIG_KEYS`) and implementation values renamed. A
    record may predate a key, hence ``.get``."""
    out = copy.deepcopy(recorded)
    for old, new in (CONFIG_KEYS if keys is None else keys).items():
        _move(out, old, new)
    if "implementation" in out:
        out["implementation"] = implementation(out["implementation"])
    _layer_specs(out.get("layers"))
    return out


def results(data: dict[str, Any]) -> dict[str, Any]:
    """A run's results (results.json or a W&B summary) with old field names mapped to today's:
    a record written before the rename has its executed MACs under ``macs``."""
    out = dict(data)
    for old, new in RESULT_KEYS.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    return out
