"""Step 1 of the recipe: the job -- process group, device, process-wide state, run folder."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from kron import distributed
from kron.distributed import DistContext
from kron.errors import ConfigError, OutputFolderError
from kron.fileio import disk_error, remove_stale_temps
from kron.recipe.checkpoint import run_marker
from kron.recipe.record import RunRecord, run_log, write_record
from kron.runtime import JobSettings, configure_allocator, job_scope


@dataclass
class Job:
    """Where and how this process trains: its rank, device, numerics, run folder and notes."""

    out_dir: Path
    dist: DistContext
    amp_dtype: torch.dtype | None  # None: no autocast
    channels_last: bool
    allocator: str
    notes: list[str] = field(default_factory=list)  # one line each, recorded in results.json

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def cuda(self) -> bool:
        return self.dist.device.type == "cuda"

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world(self) -> int:
        return self.dist.world_size

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def autocast(self) -> Any:
        """Autocast on CUDA when ``amp`` is on; nothing on the CPU."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A batch moved to the job's device (and to channels_last when the model is)."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def say(self, line: str) -> None:
        """Print ``line`` on rank 0 and keep it for results.json."""
        self.notes.append(line)
        if self.is_main:
            print(line, flush=True)


def wants_cuda(device: str) -> bool:
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def shared_run_dir(out_dir: Path, ctx: DistContext) -> Path:
    """Rank 0's run folder on every rank (each torchrun process gets its own Hydra folder; the
    unused ones, empty or holding only Hydra's files, are removed)."""
    shared = Path(distributed.broadcast_object(str(out_dir)))
    if shared != out_dir and out_dir.is_dir() and {
            p.name for p in out_dir.iterdir()} <= {".hydra", "train.log"}:
        shutil.rmtree(out_dir, ignore_errors=True)
    return shared


def make_run_dir(run_dir: Path) -> None:
    """Create the run folder; a read-only or full parent is one :class:`OutputFolderError`."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise disk_error(run_dir, err) or OutputFolderError(
            f"cannot create run folder {run_dir} ({err.strerror}); choose another "
            "hydra.run.dir") from None


@contextmanager
def hold_run_dir(run_dir: Path, record: RunRecord) -> Iterator[None]:
    """Rank 0's hold on the run folder: the run marker (refused, with nothing written, when a
    live job holds it), then its log opened, stale temporary files removed and the run's
    record written (kron/recipe/record.py)."""
    with run_marker(run_dir), run_log(run_dir):
        for p in remove_stale_temps(run_dir):
            print(f"removed {p} (left by a killed writer)")
        write_record(run_dir, record)
        yield


@contextmanager
def start_job(cfg: DictConfig, out_dir: str | Path, record: RunRecord | None = None
              ) -> Iterator[Job]:
    """Set up one training job and tear it down on exit, whatever happens inside.

    Order matters: seeds, flags and ``CUBLAS_WORKSPACE_CONFIG`` first (before anything touches
    CUDA), then the process group (``kron.distributed`` sets the CUDA device before the first
    collective), then the shared run folder and, on rank 0, the marker that says the run is
    running, and only then the run's record and log (a refused run writes nothing). On exit:
    the marker goes, the process group is destroyed, and every process-wide setting is put
    back (see :func:`kron.runtime.job_scope`).
    """
    allocator = configure_allocator()
    cuda = wants_cuda(cfg.device)
    settings = JobSettings(seed=int(cfg.seed), deterministic=bool(cfg.deterministic), cuda=cuda,
                           threads=cfg.threads)
    with job_scope(settings) as notes:
        try:
            ctx = distributed.init_distributed("cuda" if cuda else "cpu")
            run_dir = shared_run_dir(Path(out_dir), ctx)
            if cfg.batch_size % ctx.world_size:
                raise ConfigError(f"batch_size={cfg.batch_size} must divide by the "
                                  f"{ctx.world_size} processes; pick a multiple of it")
            make_run_dir(run_dir)
            amp = cuda and cfg.amp
            channels_last = cuda if cfg.channels_last == "auto" else bool(cfg.channels_last)
            job = Job(run_dir, ctx, getattr(torch, cfg.amp_dtype) if amp else None,
                      channels_last, allocator, list(notes))
            with hold_run_dir(run_dir, record or RunRecord()) if ctx.is_main else nullcontext():
                for line in notes if ctx.is_main else []:
                    print(line, flush=True)
                yield job
        finally:
            distributed.cleanup()
