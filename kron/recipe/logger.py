"""The W&B run of a training job (rank 0): per-epoch records, and a summary that carries the
same fields as ``results.json`` (surgery and layer plan included), so a table rendered from
W&B equals one rendered from the run folders."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kron.recipe.checkpoint import TrainState
from kron.recipe.setup import Job


class RunLog:
    """Prints each epoch's record on rank 0 and sends it to W&B when a run is open."""

    def __init__(self, job: Job, run: Any = None) -> None:
        self.job, self.run = job, run

    def __call__(self, record: dict[str, Any]) -> None:
        if not self.job.is_main:
            return
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in record.items()), flush=True)
        if self.run is not None:
            self.run.log(record, step=record["epoch"])

    def summary(self, results: dict[str, Any]) -> None:
        """Put every field of ``results`` (as written to results.json) in the run summary."""
        if self.run is not None:
            self.run.summary.update(results)


@contextmanager
def open_log(cfg: DictConfig, job: Job, state: TrainState) -> Iterator[RunLog]:
    """A :class:`RunLog`; on rank 0 with ``wandb.mode`` not disabled, around a W&B run that
    resumes ``state.wandb_id`` (and records its id in ``state``). The run is finished on exit."""
    if not job.is_main or cfg.wandb.mode == "disabled":
        yield RunLog(job)
        return
    import wandb

    w = cfg.wandb
    run = wandb.init(project=w.get("project", "kron"), entity=w.get("entity"),
                     group=w.get("group"), name=w.get("name"), tags=list(w.get("tags") or []),
                     mode=w.mode, dir=str(job.out_dir),
                     config=OmegaConf.to_container(cfg, resolve=True), id=state.wandb_id,
                     resume="allow")
    state.wandb_id = run.id
    try:
        yield RunLog(job, run)
    finally:
        run.finish()
