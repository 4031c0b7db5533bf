"""The run's own record: ``.hydra/{config,overrides,hydra}.yaml`` and ``train.log``.

Hydra would write both before the job function runs, that is before kron knows whether the run
folder belongs to a live job; a refused run would then overwrite the live run's record.
configs/train.yaml therefore turns Hydra's record off (``hydra.output_subdir: null``,
``hydra/job_logging: none``), and rank 0 writes the same files here once it holds the folder's
run marker, whatever the launcher (plain, multirun, torchrun, submitit). See docs/design.md,
D8.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from kron.fileio import atomic_write_text

RECORD_DIR = ".hydra"
LOG_NAME = "train.log"
DAY_FOLDER = re.compile(r"\d{4}-\d{2}-\d{2}")  # configs/train.yaml: hydra.run.dir's day


@dataclass
class RunRecord:
    """What a run writes about itself once it holds its folder.

    ``files``: name -> YAML text for ``.hydra/`` (empty outside Hydra). ``search_root``: the
    folder ``resume=true`` may search beyond the run folder (the folder of the day folders, or
    the sweep folder); None: only the run folder.
    """

    files: dict[str, str] = field(default_factory=dict)
    search_root: Path | None = None


def hydra_record(task_cfg: DictConfig) -> RunRecord:
    """The record Hydra would have written for the running job (call inside a Hydra job)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.instance().cfg
    hc = HydraConfig.get()
    files = {"config.yaml": OmegaConf.to_yaml(task_cfg),
             "hydra.yaml": OmegaConf.to_yaml(hydra_cfg),
             "overrides.yaml": OmegaConf.to_yaml(OmegaConf.create(list(hc.overrides.task)))}
    return RunRecord(files, search_root(hc, hc.mode == RunMode.MULTIRUN))


def search_root(hc: Any, multirun: bool) -> Path | None:
    """Where ``resume=true`` looks beyond the run folder: a multirun's sweep folder; the folder
    of the day folders when the run folder keeps kron's ``<root>/<YYYY-MM-DD>/<time>`` layout
    and ``hydra.run.dir`` was not set on the command line; else nowhere (a folder the user
    named holds one run, and what lies above it is not kron's)."""
    if multirun:
        return Path(str(hc.sweep.dir)).absolute()
    if any(o.split("=")[0].lstrip("+~") == "hydra.run.dir" for o in hc.overrides.hydra):
        return None
    run_dir = Path(str(hc.runtime.output_dir)).absolute()
    return run_dir.parents[1] if DAY_FOLDER.fullmatch(run_dir.parent.name) else None


def unusable_folder(folder: str | Path) -> str | None:
    """Why ``folder`` cannot be created or written (one line), or None if it looks usable: the
    nearest existing folder on its path must be a folder this process may write into."""
    folder = Path(folder).absolute()
    near = next(p for p in (folder, *folder.parents) if p.exists())
    if not near.is_dir():
        return f"cannot create {folder}: {near} is a file, not a folder"
    if not os.access(near, os.W_OK | os.X_OK):
        return f"cannot create {folder}: {near} is not writable"
    return None


class OutputFolderCheck(Callback):
    """Hydra callback (configs/train.yaml): before Hydra creates the run or sweep folder, check
    that it can, so an unusable ``hydra.run.dir`` is one line on stderr (exit 2), not Hydra's
    traceback from ``mkdir``."""

    def _check(self, folder: Any, key: str) -> None:
        problem = unusable_folder(str(folder))
        if problem:
            print(f"error: {problem} (choose another {key})", file=sys.stderr)
            raise SystemExit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")


def write_record(folder: Path, record: RunRecord) -> None:
    """Write ``record.files`` into ``folder/.hydra`` (atomic each)."""
    for name, text in record.files.items():
        atomic_write_text(folder / RECORD_DIR / name, text)


class _Tee:
    """A text stream that writes to the console and to the run's log file."""

    def __init__(self, console: IO[str], log: IO[str]) -> None:
        self.console, self.log = console, log

    def write(self, text: str) -> int:
        self.log.write(text)
        return self.console.write(text)

    def flush(self) -> None:
        self.log.flush()
        self.console.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...: the console's
        return getattr(self.console, name)


@contextmanager
def run_log(folder: Path) -> Iterator[None]:
    """Copy what this process prints on stdout (and logs through ``logging``) into
    ``folder/train.log``, appended (a resumed run continues its log). The progress bar writes
    to stderr and stays out of it."""
    with open(folder / LOG_NAME, "a", encoding="utf-8", buffering=1) as f:
        handler = logging.StreamHandler(f)
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - "
                                               "%(message)s"))
        root, stdout = logging.getLogger(), sys.stdout
        root.addHandler(handler)
        sys.stdout = _Tee(stdout, f)
        try:
            yield
        finally:
            sys.stdout = stdout
            root.removeHandler(handler)
