"""The training entrypoint: ``python -m kron.train [group=option] [key=value ...]``.

The recipe, top to bottom (each step is a function in ``kron/recipe/``):

1. check the config and start the job (process group, device, seeds and flags, run folder,
   then the run's record and log once the folder is held);
2. build the baseline net, swap its layers (surgery), optionally plan the layers, place it
   (before the data, so a ``layers=`` that cannot be built fails at once);
3. build this rank's data loaders;
4. build the optimizer, resume from a checkpoint if asked, and fit (train, evaluate, checkpoint);
5. measure params, MACs and latency against the dense twin;
6. write ``results.json`` and the W&B summary (the same fields).

Data-parallel: ``torchrun --nproc_per_node=N -m kron.train ...`` or a submitit launcher with
several tasks (``batch_size`` is the global batch). Resume: ``resume=true`` (this run folder,
else the newest earlier run of the same config under the folder of the day folders or the sweep
folder, that is not running) or ``resume=PATH`` (only a checkpoint of this run, unless
``resume_force=true``).
See docs/design.md, D6 and D8.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kron.config_schema import check_train_config
from kron.errors import debug_wanted, one_line, user_errors
from kron.paths import CONFIG_DIR as PACKAGE_CONFIG_DIR
from kron.recipe.checkpoint import CKPT_NAME
from kron.recipe.data import build_data
from kron.recipe.logger import open_log
from kron.recipe.loop import fit
from kron.recipe.model import build_net
from kron.recipe.optim import build_optimizer
from kron.recipe.record import RunRecord, hydra_record
from kron.recipe.results import measure_against_dense, results_record, write_results
from kron.recipe.resume import resume_state
from kron.recipe.setup import start_job

__all__ = ["CKPT_NAME", "CONFIG_DIR", "check_config", "main", "train"]

#: the config tree inside the package (absolute, so the `kron-train` script finds it anywhere)
CONFIG_DIR = str(PACKAGE_CONFIG_DIR)


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` (one line naming the key) if ``cfg`` breaks the schema."""
    check_train_config(OmegaConf.to_container(cfg, resolve=True))


def train(cfg: DictConfig, out_dir: str | Path, overrides: list[str] | None = None,
          record: RunRecord | None = None) -> dict[str, Any]:
    """Train, evaluate and measure one run as ``cfg`` says, in run folder ``out_dir``.

    ``record``: what the run writes about itself once it holds the folder (``.hydra/`` files)
    and where ``resume=true`` may search beyond ``out_dir`` (default: nowhere). Returns the
    results (also in ``out_dir/results.json``) on rank 0, ``{}`` on other ranks and when
    ``stop_after_epochs`` stopped the run early. The model is built (and ``layers=`` checked)
    before the data.
    """
    overrides = list(overrides or [])
    record = record or RunRecord()
    check_config(cfg)
    with start_job(cfg, out_dir, record) as job:
        size = int(cfg.data.input_size)
        net = build_net(cfg, job, int(cfg.data.num_classes),
                        (int(cfg.data.in_channels), size, size))
        data = build_data(cfg, job)
        optimizer = build_optimizer(cfg.optimizer, net.raw)
        scaler = torch.amp.GradScaler("cuda", enabled=job.amp_dtype == torch.float16)
        state = resume_state(cfg, job, net, optimizer, scaler, record.search_root)
        with open_log(cfg, job, state) as log:
            if not fit(cfg, job, data, net, optimizer, scaler, state, log):
                return {}
            if not job.is_main:
                return {}
            measured = measure_against_dense(cfg, job, net, data.shape)
            results = results_record(cfg, job, net, state, measured, data.num_classes,
                                     overrides)
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


if __name__ == "__main__":
    # Call the copy imported under the package's name: launchers that pickle the task function
    # (joblib, submitit) then pickle it by reference, not by value from __main__ with its globals.
    from kron.train import main as package_main

    package_main()
