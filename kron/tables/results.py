"""Where a table's runs live, and reading their ``results.json`` (or W&B summaries).

Each row runs in ``<out>/tables/<table>/runs/<experiment>/`` (Hydra's multirun subdir is the
experiment's name), so ``kron-tables run`` and ``render`` agree on paths without a manifest.
A row without a results file is never dropped: it is reported as ``missing`` (no run folder)
or ``failed`` (a folder, but no complete results: crashed, killed or still running).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kron.tables.spec import Row, Table

RESULTS = "results.json"
NEEDED = ("test_acc1", "params", "params_dense", "macs", "macs_dense")


def outputs_root() -> Path:
    """``$KRON_OUTPUTS`` or ``outputs`` (the same root as the training runs' Hydra folders)."""
    return Path(os.environ.get("KRON_OUTPUTS", "outputs"))


def table_dir(table: str, out: str | Path | None = None) -> Path:
    """``<out>/tables/<table>``: the table's runs and rendered files."""
    return Path(out or outputs_root()) / "tables" / table


def runs_dir(table: str, out: str | Path | None = None) -> Path:
    return table_dir(table, out) / "runs"


def run_dir(table: str, row: Row, out: str | Path | None = None) -> Path:
    return runs_dir(table, out) / row.experiment


@dataclass
class RunResult:
    """One row's outcome: ``status`` is ok, incomplete, failed or missing."""

    row: Row
    status: str
    data: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "incomplete")


def classify(row: Row, data: dict[str, Any] | None, path: Path | None, exists: bool) -> RunResult:
    """Status of one row from its (possibly absent) results dict."""
    if data is None:
        if not exists:
            return RunResult(row, "missing", path=path, reason="no run folder")
        return RunResult(row, "failed", path=path, reason="no results.json")
    absent = [k for k in NEEDED if data.get(k) is None]
    if absent:
        return RunResult(row, "failed", data, path, f"results lack {', '.join(absent)}")
    want = (data.get("config") or {}).get("epochs")
    done = data.get("epochs_done")
    if want is not None and done is not None and done < want:
        return RunResult(row, "incomplete", data, path, f"{done}/{want} epochs")
    return RunResult(row, "ok", data, path)


def load_run(row: Row, folder: Path) -> RunResult:
    """Read ``folder/results.json`` for ``row``; unreadable files count as failed runs."""
    f = folder / RESULTS
    if not f.is_file():
        return classify(row, None, folder, folder.is_dir())
    try:
        data = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return RunResult(row, "failed", path=folder, reason=f"unreadable results.json ({err})")
    if not isinstance(data, dict):
        return RunResult(row, "failed", path=folder, reason="results.json is not an object")
    return classify(row, data, folder, True)


def collect(table: Table, out: str | Path | None = None) -> list[RunResult]:
    """Every row of ``table`` with its result, in table order (missing rows included)."""
    return [load_run(r, run_dir(table.name, r, out)) for r in table.rows]


def collect_wandb(table: Table, project: str, api: Any = None) -> list[RunResult]:
    """Rows from a W&B project (runs synced from other machines), matched by ``wandb.name``.

    ``project`` is ``entity/project`` or ``project``. Among runs of one row the newest finished
    one wins; rows with no finished run are ``missing``. Local results are not consulted.
    """
    if api is None:
        import wandb

        api = wandb.Api()
    by_name: dict[str, Any] = {}
    for run in api.runs(project):
        cfg = run.config or {}
        name = (cfg.get("wandb") or {}).get("name") or run.name
        if run.state != "finished" or not name:
            continue
        if name not in by_name or str(run.created_at) > str(by_name[name].created_at):
            by_name[name] = run
    out = []
    for row in table.rows:
        run = by_name.get(row.experiment)
        if run is None:
            out.append(RunResult(row, "missing", reason=f"no finished run in W&B {project}"))
            continue
        data = {k: v for k, v in dict(run.summary).items() if not k.startswith("_")}
        data["config"] = dict(run.config or {})
        out.append(classify(row, data, None, True))
    return out
