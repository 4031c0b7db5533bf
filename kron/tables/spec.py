"""Paper tables as data: each ``experiments/<name>.yaml`` declares one table's runs.

A table is a list of rows; each row is one Hydra preset (``configs/preset/``, chosen with
``preset=<name>``) plus what the paper states about it. Shared ``overrides`` (e.g. the dataset)
apply to every run; ``smoke`` overrides make each row runnable on tiny synthetic data (the
tests use them). A table may ``extends`` another and pick a subset of its rows (the demo table
does).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from kron.paths import EXPERIMENTS_DIR

#: dense, Kronecker, and the low-rank baselines (``lowrank`` in the paper tables covers every
#: low-rank kind; the frontier names separable, CP and Tucker-2 convolutions apart)
FAMILIES = ("dense", "kron", "lowrank", "separable", "cp", "tucker")
PAPER_KEYS = ("acc1", "error", "params", "param_reduction", "speedup")
#: The only numbers the paper is known to state here (its abstract); which of its experiments
#: they come from is not stated.
PAPER_HEADLINE = ("3.3x speedup or 3.6x parameter reduction with less than 1% drop in "
                  "accuracy (abstract; the experiment it refers to is not stated)")
TABLE_KEYS = {"name", "title", "paper", "reference", "overrides", "smoke", "reconstruction",
              "notes", "rows", "extends", "headline", "seeds"}
ROW_KEYS = {"id", "preset", "label", "family", "paper", "budget"}
#: a row's ``preset`` was called ``experiment`` before (docs/notes/names.md); old spec files and
#: generated ``table.yaml`` files still load
OLD_ROW_KEYS = {"experiment": "preset"}


@dataclass(frozen=True)
class Row:
    """One run of a table: its Hydra preset, display label, family and paper numbers."""

    id: str
    preset: str
    label: str
    family: str
    paper: dict[str, Any] = field(default_factory=dict)
    budget: float | None = None  # a frontier row's per-layer budget (param or MAC ratio)


@dataclass(frozen=True)
class Table:
    """A declared paper table (see the module docstring)."""

    name: str
    title: str
    rows: tuple[Row, ...]
    paper: str = ""
    reference: str | None = None
    overrides: tuple[str, ...] = ()
    smoke: tuple[str, ...] = ()
    reconstruction: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    headline: bool = True
    seeds: int = 1  # seeds per row when `run`/`render` are not given --seeds

    def row(self, row_id: str) -> Row:
        for r in self.rows:
            if r.id == row_id:
                return r
        raise KeyError(f"table {self.name!r} has no row {row_id!r}; rows: "
                       f"{', '.join(r.id for r in self.rows)}")


def experiments_dir() -> Path:
    """Where table declarations live: ``$KRON_EXPERIMENTS`` or the repository's experiments/."""
    return Path(os.environ.get("KRON_EXPERIMENTS", EXPERIMENTS_DIR))


def list_tables(root: Path | None = None) -> list[str]:
    """Names of all declared tables."""
    return sorted(p.stem for p in (root or experiments_dir()).glob("*.yaml"))


def _renamed(table: str, raw: Any) -> Any:
    """``raw`` with old row keys (``experiment``) under their new names (``preset``)."""
    if not isinstance(raw, dict):
        return raw
    out = dict(raw)
    for old, new in OLD_ROW_KEYS.items():
        if old in out:
            if new in out:
                raise ValueError(f"table {table!r}, row {raw.get('id')!r}: '{old}' is the old "
                                 f"name of '{new}'; give only '{new}'")
            out[new] = out.pop(old)
    return out


def _row(table: str, raw: Any) -> Row:
    raw = _renamed(table, raw)
    if not isinstance(raw, dict) or not {"id", "preset"} <= set(raw):
        raise ValueError(f"table {table!r}: each row needs 'id' and 'preset' (a configs/preset/ "
                         f"name), got {raw!r}")
    bad = set(raw) - ROW_KEYS
    if bad:
        raise ValueError(f"table {table!r}, row {raw['id']!r}: unknown keys {sorted(bad)}")
    family = raw.get("family", "kron")
    if family not in FAMILIES:
        raise ValueError(f"table {table!r}, row {raw['id']!r}: family must be one of "
                         f"{list(FAMILIES)}, got {family!r}")
    paper = dict(raw.get("paper") or {})
    if set(paper) - set(PAPER_KEYS):
        raise ValueError(f"table {table!r}, row {raw['id']!r}: paper keys must be among "
                         f"{list(PAPER_KEYS)}, got {sorted(paper)}")
    budget = raw.get("budget")
    return Row(str(raw["id"]), str(raw["preset"]), str(raw.get("label", raw["id"])),
               family, paper, None if budget is None else float(budget))


def _seeds(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"table {name!r}: seeds must be an integer >= 1, got {value!r}")
    return value


def table_from_dict(raw: dict[str, Any], root: Path | None = None) -> Table:
    """Build a :class:`Table` from its YAML mapping (resolving ``extends``)."""
    name = raw.get("name")
    if not name:
        raise ValueError(f"a table declaration needs a 'name', got keys {sorted(raw)}")
    bad = set(raw) - TABLE_KEYS
    if bad:
        raise ValueError(f"table {name!r}: unknown keys {sorted(bad)}; valid: {sorted(TABLE_KEYS)}")
    tup = lambda key: tuple(str(v) for v in raw.get(key) or ())  # noqa: E731
    if raw.get("extends"):
        base = load_table(raw["extends"], root)
        ids = raw.get("rows") or [r.id for r in base.rows]
        if not all(isinstance(i, str) for i in ids):
            raise ValueError(f"table {name!r} extends {base.name!r}: rows must be row ids")
        return replace(
            base, name=name, title=raw.get("title", base.title),
            rows=tuple(base.row(i) for i in ids),
            reference=raw.get("reference", base.reference),
            overrides=base.overrides + tup("overrides"), smoke=base.smoke + tup("smoke"),
            reconstruction=base.reconstruction + tup("reconstruction"),
            notes=base.notes + tup("notes"), headline=raw.get("headline", base.headline),
            seeds=_seeds(name, raw.get("seeds", base.seeds)))
    rows = tuple(_row(name, r) for r in raw.get("rows") or ())
    if not rows:
        raise ValueError(f"table {name!r} declares no rows")
    ids = [r.id for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"table {name!r}: duplicate row ids in {ids}")
    ref = raw.get("reference")
    if ref is not None and ref not in ids:
        raise ValueError(f"table {name!r}: reference {ref!r} is not a row id ({', '.join(ids)})")
    return Table(name=name, title=str(raw.get("title", name)), rows=rows,
                 paper=str(raw.get("paper", "")), reference=ref, overrides=tup("overrides"),
                 smoke=tup("smoke"), reconstruction=tup("reconstruction"), notes=tup("notes"),
                 headline=bool(raw.get("headline", True)), seeds=_seeds(name, raw.get("seeds", 1)))


def load_table(name: str, root: Path | None = None) -> Table:
    """Load ``experiments/<name>.yaml`` (or a path to a YAML file)."""
    root = root or experiments_dir()
    path = Path(name) if name.endswith((".yaml", ".yml")) else root / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"no table {name!r} (looked for {path}); tables: "
                         f"{', '.join(list_tables(root)) or 'none'}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a table declaration must be a YAML mapping")
    return table_from_dict(raw, path.parent)
