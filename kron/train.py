"""The training entrypoint: ``python -m kron.train [group=option] [key=value ...]``.

:func:`train` is the recipe, top to bottom; each step takes its own typed part of the config
(kron/recipe/settings.py), and lives in kron/recipe/steps.py (set up, model, data, measure,
results), kron/recipe/fit.py (optimizer, epochs, evaluation, W&B log) or
kron/recipe/checkpoint.py (checkpoints, resume, run markers). The model is built (and
``layers=`` checked) before the data, so a spec that cannot be built fails at once.

Data-parallel: ``torchrun --nproc_per_node=N -m kron.train ...`` or a submitit launcher with
several tasks (``batch_size`` is the global batch). Resume: ``resume=true`` (this run folder,
else the newest earlier run of the same config under the folder of the day folders or the sweep
folder, that is not running) or ``resume=PATH`` (only a checkpoint of this run, unless
``resume_force=true``). The Hydra glue (the run's record, the resume search root, the output
folder check) is at the end. See docs/design.md, D6 and D8.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from kron.config_schema import check_train_config
from kron.errors import debug_wanted, one_line, user_errors
from kron.paths import CONFIG_DIR as PACKAGE_CONFIG_DIR
from kron.recipe.checkpoint import CKPT_NAME, resume_state
from kron.recipe.fit import fit, open_log, start_training
from kron.recipe.settings import RunSettings
from kron.recipe.steps import (
    RunRecord,
    build_data,
    build_net,
    measure_against_dense,
    results_record,
    start_job,
    write_results,
)

__all__ = ["CKPT_NAME", "CONFIG_DIR", "check_config", "main", "train"]

#: the config tree inside the package (absolute, so the `kron-train` script finds it anywhere)
CONFIG_DIR = str(PACKAGE_CONFIG_DIR)
DAY_FOLDER = re.compile(r"\d{4}-\d{2}-\d{2}")  # configs/train.yaml: hydra.run.dir's day


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` (one line naming the key) if ``cfg`` breaks the schema."""
    check_train_config(OmegaConf.to_container(cfg, resolve=True))


def train(cfg: DictConfig, out_dir: str | Path, overrides: list[str] | None = None,
          record: RunRecord | None = None) -> dict[str, Any]:
    """Train, evaluate and measure one run as ``cfg`` says, in run folder ``out_dir``.

    ``record``: what the run writes about itself once it holds the folder (``.hydra/`` files)
    and where ``resume=true`` may search beyond ``out_dir`` (default: nowhere). Returns the
    results (also in ``out_dir/results.json``) on rank 0, ``{}`` on other ranks and when
    ``stop_after_epochs`` stopped the run early.
    """
    check_config(cfg)
    run = RunSettings.of(cfg, overrides)
    record = record or RunRecord()
    with start_job(run.setup, out_dir, record) as job:
        net = build_net(run.model, run.place, job)
        data = build_data(run.data, job)
        training = start_training(run.fit, job, net)
        training.state = resume_state(run.resume, job, training, record.search_root)
        with open_log(run.wandb, run.config, job, training.state) as log:
            if not fit(run.fit, job, data, training, log) or not job.is_main:
                return {}
            measured = measure_against_dense(run.measure, job, net, data.shape)
            results = results_record(run, job, net, training.state, measured)
            write_results(job, results)
            log.summary(results)
            return results


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float | None:
    """Hydra's job function: the run folder, overrides and record come from Hydra; returns
    top-1. A user's mistake (kron's error types) is one line on stderr and exit code 2,
    unless ``HYDRA_FULL_ERROR=1`` or ``KRON_DEBUG=1`` asks for the traceback."""
    hc = HydraConfig.get()
    try:
        results = train(cfg, hc.runtime.output_dir, list(hc.overrides.task), hydra_record(cfg))
    except user_errors() as err:
        if debug_wanted():
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    return results.get("test_acc1")


def main() -> None:
    """The command line (``python -m kron.train``, ``kron-train``): set up the allocator, load
    this machine's cost-model calibration if one was measured, check the command line's
    overrides against the schema (one line on stderr and exit code 2 if wrong), then hand over
    to Hydra."""
    from kron.calibrate import load_defaults
    from kron.cli_check import cli_config_error
    from kron.runtime import configure_allocator

    configure_allocator()
    load_defaults()  # the cost model's constants measured here by `kron.bench calibrate`, if any
    problem = cli_config_error(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    hydra_main()


# ----------------------------------------------------------------------------- Hydra glue
# Hydra would write .hydra/ before the job function runs, that is before kron knows whether the
# run folder belongs to a live job; a refused run would then overwrite the live run's record.
# configs/train.yaml therefore turns Hydra's record off (``hydra.output_subdir: null``,
# ``hydra/job_logging: none``), and rank 0 writes the same files (kron/recipe/steps.py:
# start_job) once it holds the folder's run marker, whatever the launcher. See docs/design.md, D8.
def hydra_record(task_cfg: DictConfig) -> RunRecord:
    """The record Hydra would have written for the running job (call inside a Hydra job)."""
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


if __name__ == "__main__":
    # Call the copy imported under the package's name: launchers that pickle the task function
    # (joblib, submitit) then pickle it by reference, not by value from __main__ with its globals.
    from kron.train import main as package_main

    package_main()
