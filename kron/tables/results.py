"""Where a table's runs live, and reading their ``results.json`` (or W&B summaries).

Each (row, seed) runs in ``<out>/tables/<table>/runs/<preset>/seed<k>/`` (Hydra's multirun
subdir is the preset's name and the seed), so ``kron-tables run`` and ``render`` agree on
paths without a manifest. A run is never dropped; its status is one of (docs/design.md, D9):

- ``ok``: a results.json with every number a table needs;
- ``incomplete``: stopped before its last epoch (a checkpoint, or a W&B summary, says k/n
  epochs; ``resume=true`` continues it), so it has no final numbers;
- ``failed``: a run folder but no usable results (crashed before its first checkpoint,
  unreadable or partial results.json, a crashed W&B run);
- ``missing``: never run (no folder, no W&B run).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kron.tables import renames
from kron.tables.spec import Row, Table

RESULTS = "results.json"
CHECKPOINT = "last.pt"  # kron.train's per-epoch checkpoint (CKPT_NAME)
NEEDED = ("test_acc1", "params", "params_dense", "macs_executed", "macs_dense")


def outputs_root() -> Path:
    """``$KRON_OUTPUTS`` or ``outputs`` (the same root as the training runs' Hydra folders)."""
    return Path(os.environ.get("KRON_OUTPUTS", "outputs"))


def table_dir(table: str, out: str | Path | None = None) -> Path:
    """``<out>/tables/<table>``: the table's runs and rendered files."""
    return Path(out or outputs_root()) / "tables" / table


def runs_dir(table: str, out: str | Path | None = None) -> Path:
    return table_dir(table, out) / "runs"


def seed_dirname(seed: int) -> str:
    """The run folder's name for one seed: ``seed0``, ``seed1``, ..."""
    return f"seed{int(seed)}"


def row_dir(table: str, row: Row, out: str | Path | None = None) -> Path:
    """``runs/<preset>``: the folder holding one ``seed<k>`` folder per seed of ``row``."""
    return runs_dir(table, out) / row.preset


def run_dir(table: str, row: Row, out: str | Path | None = None, seed: int = 0) -> Path:
    """The run folder of ``row`` with ``seed``."""
    return row_dir(table, row, out) / seed_dirname(seed)


def seeds_found(table: Table, out: str | Path | None = None) -> int:
    """1 + the largest seed with a run folder among the table's rows (0 when none ran)."""
    top = -1
    for row in table.rows:
        folder = row_dir(table.name, row, out)
        if folder.is_dir():
            for p in folder.glob("seed*"):
                if p.is_dir() and p.name[4:].isdigit():
                    top = max(top, int(p.name[4:]))
    return top + 1


def asked_seeds(table: Table, out: str | Path | None = None, seeds: int | None = None) -> int:
    """How many seeds each row should have: ``seeds`` if given, else the table's declared
    ``seeds`` or, when more ran, as many as the highest seed that has a folder."""
    if seeds is not None:
        if seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {seeds}")
        return int(seeds)
    return max(table.seeds, seeds_found(table, out))


@dataclass
class RunResult:
    """One run's outcome: ``status`` is ok, incomplete, failed or missing (module docstring)."""

    row: Row
    status: str
    data: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    reason: str = ""
    seed: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _epochs_wanted(data: dict[str, Any]) -> Any:
    recorded = data.get("config")  # a record's config, which may predate a key
    return recorded.get("epochs") if isinstance(recorded, dict) else None


def classify(row: Row, data: dict[str, Any] | None, path: Path | None, exists: bool,
             seed: int = 0, epochs_done: int | None = None) -> RunResult:
    """Status of one run from its (possibly absent) results dict.

    ``epochs_done``: how far a run without complete results got (from its checkpoint or its
    W&B summary's ``epoch``); fewer than the config's epochs makes it incomplete. Fields
    under an older name (``macs``: the executed count) are read under today's
    (:mod:`kron.tables.renames`), so old records render as new ones.
    """
    data = None if data is None else renames.results(data)
    if data is None and not exists:
        return RunResult(row, "missing", path=path, reason="not run", seed=seed)
    absent = [k for k in NEEDED if (data or {}).get(k) is None]
    if not absent:
        return RunResult(row, "ok", dict(data or {}), path, seed=seed)
    want = _epochs_wanted(data or {})
    if epochs_done is not None and want is not None and epochs_done < int(want):
        return RunResult(row, "incomplete", {}, path, f"stopped after {epochs_done}/{want} "
                         "epochs", seed)
    if data is None:
        return RunResult(row, "failed", path=path, reason="no results.json", seed=seed)
    return RunResult(row, "failed", dict(data), path, f"results lack {', '.join(absent)}", seed)


def checkpoint_epochs(folder: Path) -> tuple[int, int] | None:
    """(epochs done, epochs configured) from a run's checkpoint, or None without one."""
    ckpt = folder / CHECKPOINT
    if not ckpt.is_file():
        return None
    import torch
    import yaml

    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
        config = yaml.safe_load(state.get("config") or "") or {}
        return int(state["epoch"]), int(config["epochs"])
    except Exception:  # noqa: BLE001 - a torn or foreign checkpoint tells us nothing
        return None


def load_run(row: Row, folder: Path, seed: int = 0) -> RunResult:
    """Read ``folder/results.json`` for ``row``; unreadable files count as failed runs."""
    f = folder / RESULTS
    if not f.is_file():
        progress = checkpoint_epochs(folder) if folder.is_dir() else None
        if progress is None:
            return classify(row, None, folder, folder.is_dir(), seed)
        done, want = progress
        return classify(row, {"config": {"epochs": want}}, folder, True, seed, done) \
            if done < want else classify(row, None, folder, True, seed)
    try:
        data = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return RunResult(row, "failed", path=folder, reason=f"unreadable results.json ({err})",
                         seed=seed)
    if not isinstance(data, dict):
        return RunResult(row, "failed", path=folder, reason="results.json is not an object",
                         seed=seed)
    return classify(row, data, folder, True, seed)


def collect(table: Table, out: str | Path | None = None,
            seeds: int | None = None) -> list[RunResult]:
    """Every (row, seed) of ``table`` with its result, rows in table order then seeds
    ``0..seeds-1`` (missing runs included); ``seeds`` as :func:`asked_seeds`."""
    n = asked_seeds(table, out, seeds)
    return [load_run(r, run_dir(table.name, r, out, s), s) for r in table.rows for s in range(n)]


def _wandb_config_value(logged: dict[str, Any], key: str) -> Any:
    """A value of a W&B run's logged config (``{"value": v, "desc": ...}`` or plain)."""
    value = logged.get(key)
    return value.get("value") if isinstance(value, dict) and set(value) <= {"value", "desc"} \
        else value


def collect_wandb(table: Table, project: str, api: Any = None,
                  seeds: int | None = None) -> list[RunResult]:
    """Runs from W&B (synced from other machines), matched by ``wandb.name`` and ``seed``.

    ``project`` is ``entity/project`` or ``project``; ``api`` anything with ``runs(project)``
    like ``wandb.Api()`` (the default), e.g. :class:`kron.tables.wandb_offline.OfflineRuns`.
    Among runs of one (row, seed) the newest finished one wins; without a finished one the
    newest says the status (running: incomplete at its last logged epoch; crashed, failed,
    killed: failed). Local results are not consulted.
    """
    if api is None:
        import wandb

        api = wandb.Api()
    finished: dict[tuple[str, int], Any] = {}
    other: dict[tuple[str, int], Any] = {}
    for run in api.runs(project):
        cfg = run.config or {}
        name = (_wandb_config_value(cfg, "wandb") or {}).get("name") or run.name
        if not name:
            continue
        key = (name, int(_wandb_config_value(cfg, "seed") or 0))
        pool = finished if run.state == "finished" else other
        if key not in pool or str(run.created_at) > str(pool[key].created_at):
            pool[key] = run
    n = seeds if seeds is not None else max(
        [table.seeds] + [s + 1 for (name, s) in {**finished, **other}
                         if name in {r.preset for r in table.rows}])
    out = []
    for row in table.rows:
        for seed in range(n):
            out.append(_wandb_result(row, seed, finished.get((row.preset, seed)),
                                     other.get((row.preset, seed))))
    return out


def _wandb_result(row: Row, seed: int, done: Any, latest: Any) -> RunResult:
    run = done or latest
    if run is None:
        return RunResult(row, "missing", reason="not run", seed=seed)
    summary = {k: v for k, v in dict(run.summary).items() if not k.startswith("_")}
    config = {k: _wandb_config_value(run.config or {}, k) for k in (run.config or {})}
    data = {**summary, "config": config}
    epoch = summary.get("epoch")
    if run is done:
        return classify(row, data, None, True, seed, None if epoch is None else int(epoch))
    if run.state == "running":
        return classify(row, {"config": config}, None, True, seed,
                        int(epoch) if epoch is not None else 0)
    return RunResult(row, "failed", reason=f"W&B run {run.state}", seed=seed)


def by_row(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    """The runs of each row id, in order."""
    out: dict[str, list[RunResult]] = {}
    for r in results:
        out.setdefault(r.row.id, []).append(r)
    return out
