"""Launch a table's runs as one Hydra multirun of ``kron.train``.

Rows are swept over ``experiment=``; each lands in ``<out>/tables/<table>/runs/<experiment>/``
(``hydra.sweep.subdir`` is the experiment's name), which is where ``render`` looks. Rows whose
``results.json`` exists are skipped unless ``redo``, or it was made with other overrides or a
config that now composes differently (an edited table or experiment file); a rerun row's old
folder is renamed, not deleted. ``launcher`` picks
configs/launcher/<name>.yaml (local: one after another; joblib: local processes in parallel;
slurm, slurm_cpu: submitit).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kron.tables.results import RESULTS, run_dir, runs_dir
from kron.paths import CONFIG_DIR
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
                  launcher: str = "local") -> list[str]:
    """The overrides one row's job sees (what kron.train saves as ``overrides``)."""
    return [f"experiment={row.experiment}", *table.overrides, *extra,
            *([f"launcher={launcher}"] if launcher != "local" else [])]


def stale(table: Table, row: Row, out: str | Path | None, extra: Sequence[str] = (),
          launcher: str = "local") -> bool:
    """True when the row's results.json was made with other overrides than these, or with a
    config that differs from what these overrides compose to now (an edited experiment or base
    config file)."""
    try:
        saved = json.loads((run_dir(table.name, row, out) / RESULTS).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(saved, dict):
        return False
    want = job_overrides(table, row, extra, launcher)
    if saved.get("overrides") is not None and _normal(saved["overrides"]) != _normal(want):
        return True
    now = composed_config(want)
    return bool(now is not None and isinstance(saved.get("config"), dict)
                and _comparable(saved["config"]) != _comparable(now))


def composed_config(overrides: Sequence[str]) -> dict | None:
    """The resolved training config these overrides compose to, or None if they do not
    compose here (e.g. a table whose experiment files live elsewhere)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return OmegaConf.to_container(compose("train", overrides=list(overrides)),
                                          resolve=True)
    except Exception:  # noqa: BLE001 - any composition error: fall back to the overrides
        return None


def _comparable(config: dict) -> dict:
    """A config without what does not change a run's result: how data is loaded, and where
    the run ran (launcher) or resumed from."""
    config = json.loads(json.dumps(config, default=str))
    config.get("data", {}).pop("loader", None)
    for key in ("resume", "progress", "log_every"):
        config.pop(key, None)
    return config


def _normal(overrides: Sequence[str]) -> list[str]:
    """Overrides in a comparable form, as Hydra applies them: parsed (``progress=false`` ==
    ``progress=False``), the last value of a repeated key winning, the launcher ignored."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception:  # noqa: BLE001 - unparsable: compare the text
        return sorted(overrides)
    last = {o.get_key_element(): f"{o.value()!r}" for o in parsed}
    last.pop("launcher", None)  # where a run ran does not change its result
    return sorted(f"{k}={v}" for k, v in last.items())


def pending(table: Table, rows: Sequence[Row], out: str | Path | None, redo: bool,
            extra: Sequence[str] = (), launcher: str = "local") -> tuple[list[Row], list[Row]]:
    """Split ``rows`` into (to run, skipped because an up-to-date results.json exists).

    A results.json made with different overrides (e.g. after editing the table) is rerun.
    """
    todo, skipped = [], []
    for r in rows:
        done = (run_dir(table.name, r, out) / RESULTS).is_file()
        if done and not redo and not stale(table, r, out, extra, launcher):
            skipped.append(r)
        else:
            todo.append(r)
    return todo, skipped


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
        if key.lstrip("+~") == "experiment":
            raise ValueError(f"override {o!r}: rows choose the experiment; use --rows instead")
        if key.startswith("hydra.sweep"):
            raise ValueError(f"override {o!r}: kron-tables sets hydra.sweep.* itself")
        if value.startswith(("glob(", "range(", "choice(")) or _has_top_level_comma(value):
            raise ValueError(f"override {o!r} sweeps several values; one table run gives one "
                             "folder per row, so run the table once per value instead")


def multirun_command(table: Table, rows: Sequence[Row], out: str | Path | None = None,
                     launcher: str = "local", extra: Sequence[str] = ()) -> list[str]:
    """The ``python -c "from kron.train import main; main()" -m ...`` line that runs ``rows``."""
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
           "experiment=" + ",".join(r.experiment for r in rows),
           *table.overrides, *extra,
           f"hydra.sweep.dir={sweep_dir}",
           "hydra.sweep.subdir=${hydra:runtime.choices.experiment}"]
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
              dry_run: bool = False) -> int:
    """Run the table's pending rows; returns the multirun's exit status (0 if nothing to do)."""
    chosen = select_rows(table, rows)
    todo, skipped = pending(table, chosen, out, redo, extra, launcher)
    for r in skipped:
        print(f"skip {r.id}: {run_dir(table.name, r, out) / RESULTS} exists (--redo reruns it)")
    if not todo:
        print(f"{table.name}: every selected row has results; nothing to run")
        return 0
    cmd = multirun_command(table, todo, out, launcher, extra)
    print(f"{table.name}: running {len(todo)} row(s): {', '.join(r.id for r in todo)}")
    print("$ " + shlex.join(cmd), flush=True)
    if dry_run:
        return 0
    for r in todo:  # redone or stale rows keep their old folder, renamed
        folder = run_dir(table.name, r, out)
        if (folder / RESULTS).is_file():
            why = "redo" if redo else "overrides changed"
            print(f"{why} {r.id}: old folder moved to {set_aside(folder)}")
    code = subprocess.call(cmd)
    if code:
        print(f"{table.name}: the multirun exited with status {code}; rows without results "
              "are marked failed by `kron-tables render`", file=sys.stderr)
    return code
