"""Launch a table's runs as Hydra multiruns of ``kron.train``, each row with N seeds.

Rows are swept over ``preset=`` and ``seed=``; each run lands in
``<out>/tables/<table>/runs/<preset>/seed<k>/`` (``hydra.sweep.subdir`` is the preset's
name and the seed), which is where ``render`` looks. Runs whose ``results.json`` exists are
skipped unless ``redo``, or it was made with other overrides or a config that now composes
differently (an edited table or preset file); a rerun's old folder is renamed, not deleted.
Records written under older names compare through :mod:`kron.tables.renames`.
Rows that lack the same seeds go in one multirun (a grid of rows x seeds), so asking for more
seeds later runs only the new ones. ``launcher`` picks
configs/launcher/<name>.yaml (local: one after another; joblib: local processes in parallel;
slurm, slurm_cpu: submitit).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kron.paths import CONFIG_DIR
from kron.tables import renames
from kron.tables.plan_check import layers_changed
from kron.tables.results import RESULTS, run_dir, runs_dir
from kron.tables.spec import Row, Table

ENTRY = "from kron.train import main; main()"


def launchers() -> list[str]:
    """The launcher configs (configs/launcher/*.yaml): local, joblib, slurm, slurm_cpu, ..."""
    return sorted(p.stem for p in (CONFIG_DIR / "launcher").glob("*.yaml"))


def select_rows(table: Table, ids: Sequence[str] | None) -> list[Row]:
    """The rows named in ``ids`` (all when empty), in table order; unknown ids are an error."""
    if not ids:
        return list(table.rows)
    for i in ids:
        table.row(i)  # raises naming the valid ids
    return [r for r in table.rows if r.id in set(ids)]


def job_overrides(table: Table, row: Row, extra: Sequence[str] = (),
                  launcher: str = "local", seed: int = 0) -> list[str]:
    """The overrides one run's job sees (what kron.train saves as ``overrides``)."""
    return [f"preset={row.preset}", f"seed={seed}", *table.overrides, *extra,
            *([f"launcher={launcher}"] if launcher != "local" else [])]


def stale(table: Table, row: Row, out: str | Path | None, extra: Sequence[str] = (),
          launcher: str = "local", seed: int = 0) -> str | None:
    """Why the run's record no longer stands (None: it does): its results.json was made with
    other overrides than these, or with a config that differs from what these overrides
    compose to now (an edited preset or base config file; the first differing key is named),
    or that config's surgery builds other layers today than the record's (a changed shape rule
    or rank search: :mod:`kron.tables.plan_check`). Old names in the record (``experiment=``,
    see :mod:`kron.tables.renames`) compare as today's."""
    try:
        saved = json.loads((run_dir(table.name, row, out, seed) / RESULTS).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict):
        return None
    want = job_overrides(table, row, extra, launcher, seed)
    if saved.get("overrides") is not None and _normal(saved["overrides"]) != _normal(want):
        return "overrides changed"
    now = composed_config(want)
    if now is None or not isinstance(saved.get("config"), dict):
        return None
    hit = first_difference(comparable_config(saved["config"]), comparable_config(now))
    if hit is not None:
        return f"config changed ({hit[0]})"
    if layers_changed(now, saved.get("surgery")):  # the same config, other shapes today
        return "layers changed (today's code builds other shapes for this config)"
    return None


#: the value :func:`first_difference` reports for a key one side lacks
ABSENT = object()


def flat_leaves(d: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of nested mappings by dotted key (an empty mapping has none)."""
    if not isinstance(d, Mapping):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flat_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def first_difference(old: Mapping[str, Any], new: Mapping[str, Any]
                     ) -> tuple[str, Any, Any] | None:
    """The first leaf whose value differs between two nested configs (in ``new``'s order,
    then the keys only ``old`` has): ``(dotted key, old value, new value)``, :data:`ABSENT`
    for a side that lacks it; None when they match."""
    a, b = flat_leaves(old), flat_leaves(new)
    for key in [*b, *(k for k in a if k not in b)]:
        va, vb = a.get(key, ABSENT), b.get(key, ABSENT)
        if va != vb:
            return key, va, vb
    return None


def composed_config(overrides: Sequence[str]) -> dict | None:
    """The resolved training config these overrides compose to, or None if they do not
    compose here (e.g. a table whose preset files live elsewhere)."""
    from omegaconf import OmegaConf

    from kron.config_compose import compose_train

    try:
        return OmegaConf.to_container(compose_train(overrides), resolve=True)
    except Exception:  # noqa: BLE001 - any composition error: fall back to the overrides
        return None


def comparable_config(config: dict) -> dict:
    """A config without what does not change a run's result: how data is loaded, where the
    run ran (launcher) or resumed from, and where its log went (``wandb.mode``, which follows
    ``$WANDB_MODE``); renamed keys and values under today's names."""
    # a record's config, which may predate a key (hence .get, not indexing)
    record = renames.config(json.loads(json.dumps(config, default=str)))
    record.get("data", {}).pop("loader", None)
    record.get("wandb", {}).pop("mode", None)
    for key in ("resume", "resume_force", "progress", "log_every"):
        record.pop(key, None)
    return record


def _normal(overrides: Sequence[str]) -> list[str]:
    """Overrides in a comparable form, as Hydra applies them: parsed (``progress=false`` ==
    ``progress=False``), the last value of a repeated key winning, the launcher and
    ``hydra.*`` keys ignored, old names (``experiment=``) under today's (``preset=``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception:  # noqa: BLE001 - unparsable: compare the text
        return sorted(overrides)
    last = dict(renames.override(o.get_key_element(), o.value()) for o in parsed)
    last = {k: f"{v!r}" for k, v in last.items()}
    last.pop("launcher", None)  # where a run ran does not change its result
    # hydra.* (e.g. hydra.launcher.tasks_per_node) says how a run is launched, not what it
    # computes; results.json records only the task's overrides, so compare without them
    last = {k: v for k, v in last.items() if not k.startswith("hydra.")}
    return sorted(f"{k}={v}" for k, v in last.items())


Job = tuple[Row, int]  # a row and a seed


def pending(table: Table, rows: Sequence[Row], out: str | Path | None, redo: bool,
            extra: Sequence[str] = (), launcher: str = "local",
            seeds: int = 1) -> tuple[list[Job], list[Job]]:
    """Split the (row, seed) runs of ``rows`` x ``0..seeds-1`` into (to run, skipped because
    an up-to-date results.json exists).

    A results.json made with different overrides (e.g. after editing the table) is rerun.
    """
    todo, skipped = [], []
    for r in rows:
        for s in range(seeds):
            done = (run_dir(table.name, r, out, s) / RESULTS).is_file()
            if done and not redo and not stale(table, r, out, extra, launcher, s):
                skipped.append((r, s))
            else:
                todo.append((r, s))
    return todo, skipped


def grids(jobs: Sequence[Job]) -> list[tuple[list[Row], list[int]]]:
    """The (rows, seeds) grids that cover ``jobs`` exactly: rows lacking the same seeds share
    one grid (one multirun), in table order."""
    per_row: dict[str, tuple[Row, list[int]]] = {}
    for row, seed in jobs:
        per_row.setdefault(row.id, (row, []))[1].append(seed)
    out: dict[tuple[int, ...], list[Row]] = {}
    for row, seeds in per_row.values():
        out.setdefault(tuple(sorted(seeds)), []).append(row)
    return [(rows, list(seeds)) for seeds, rows in out.items()]


def _has_top_level_comma(value: str) -> bool:
    depth = 0
    for c in value:
        depth += c in "[{("
        depth -= c in "]})"
        if c == "," and depth == 0:
            return True
    return False


def check_overrides(overrides: Sequence[str]) -> None:
    """Reject overrides that would break the one-folder-per-row layout."""
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+~") in ("preset", "experiment"):
            raise ValueError(f"override {o!r}: rows choose the preset; use --rows instead")
        if key.lstrip("+~") == "seed":
            raise ValueError(f"override {o!r}: rows run seeds 0..N-1; use --seeds N instead")
        if key.startswith("hydra.sweep"):
            raise ValueError(f"override {o!r}: kron-tables sets hydra.sweep.* itself")
        if value.startswith(("glob(", "range(", "choice(")) or _has_top_level_comma(value):
            raise ValueError(f"override {o!r} sweeps several values; one table run gives one "
                             "folder per row, so run the table once per value instead")


def multirun_command(table: Table, rows: Sequence[Row], out: str | Path | None = None,
                     launcher: str = "local", extra: Sequence[str] = (),
                     seeds: Sequence[int] = (0,)) -> list[str]:
    """The ``python -c "from kron.train import main; main()" -m ...`` line that runs ``rows``
    with each of ``seeds``."""
    if launcher not in launchers():
        raise ValueError(f"launcher must be one of {launchers()} (configs/launcher/), "
                         f"got {launcher!r}")
    if not rows:
        raise ValueError(f"table {table.name!r}: no rows to run")
    check_overrides([*table.overrides, *extra])
    sweep_dir = runs_dir(table.name, out).resolve()
    # main imported from kron.train, not run as __main__: the joblib launcher pickles it, and a
    # function of __main__ would be pickled by value (with unpicklable torch module globals)
    cmd = [sys.executable, "-c", ENTRY, "-m",
           "preset=" + ",".join(r.preset for r in rows),
           "seed=" + ",".join(str(int(s)) for s in seeds),
           *table.overrides, *extra,
           f"hydra.sweep.dir={sweep_dir}",
           "hydra.sweep.subdir=${hydra:runtime.choices.preset}/seed${seed}"]  # seed_dirname
    if launcher != "local":
        cmd.append(f"launcher={launcher}")
    return cmd


def set_aside(folder: Path) -> Path:
    """Rename a row's old run folder to ``<folder>.old-<time>`` before it is redone."""
    target = folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while target.exists():
        target = folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    folder.rename(target)
    return target


def run_table(table: Table, *, rows: Sequence[str] | None = None, out: str | Path | None = None,
              redo: bool = False, launcher: str = "local", extra: Sequence[str] = (),
              dry_run: bool = False, seeds: int | None = None) -> int:
    """Run the table's pending (row, seed) runs, ``seeds`` per row (default: the table's
    ``seeds``); returns the first non-zero multirun exit status (0 if nothing to do)."""
    chosen = select_rows(table, rows)
    n = table.seeds if seeds is None else int(seeds)
    if n < 1:
        raise ValueError(f"--seeds must be >= 1, got {n}")
    check_overrides([*table.overrides, *extra])
    todo, skipped = pending(table, chosen, out, redo, extra, launcher, n)
    for r, s in skipped:
        print(f"skip {r.id} seed {s}: {run_dir(table.name, r, out, s) / RESULTS} exists "
              "(--redo reruns it)")
    if not todo:
        print(f"{table.name}: every selected run has results; nothing to run")
        return 0
    code = 0
    for grid_rows, grid_seeds in grids(todo):
        cmd = multirun_command(table, grid_rows, out, launcher, extra, grid_seeds)
        print(f"{table.name}: running {len(grid_rows)} row(s) x seeds "
              f"{','.join(map(str, grid_seeds))}: {', '.join(r.id for r in grid_rows)}")
        print("$ " + shlex.join(cmd), flush=True)
        if dry_run:
            continue
        for r in grid_rows:  # redone or stale runs keep their old folder, renamed
            for s in grid_seeds:
                folder = run_dir(table.name, r, out, s)
                if (folder / RESULTS).is_file():
                    why = "redo" if redo else (stale(table, r, out, extra, launcher, s)
                                               or "stale")
                    print(f"{why} {r.id} seed {s}: old folder moved to {set_aside(folder)}")
        status = subprocess.call(cmd)
        if status:
            print(f"{table.name}: the multirun exited with status {status}; runs without "
                  "results are marked failed by `kron-tables render`", file=sys.stderr)
            code = code or status
    return code
