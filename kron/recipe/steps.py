"""The steps of the training recipe around the fit, in the order kron/train.py calls them.

Each step takes its own part of :class:`~kron.recipe.settings.RunSettings` (``setup``,
``model``, ``place``, ``data``, ``measure``), never the whole config.

- set up (:func:`start_job`) -- process group, device, seeds and flags (restored after), run
  folder, and once rank 0 holds it, the run's record (``.hydra/``) and log (``train.log``).
- model (:func:`build_net`) -- the baseline, layer surgery, the optional layer plan, placement.
- data (:func:`build_data`) -- datasets and this rank's two loaders.
- measure (:func:`measure_against_dense`) and write results (:func:`results_record`,
  :func:`write_results`) -- ``results.json``, the run's record that the tables read.

The fit (optimizer, schedule, epochs, evaluation, W&B log) is kron/recipe/fit.py; checkpoints,
resume and run markers are kron/recipe/checkpoint.py. See docs/design.md, D6 and D8.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import hydra
import torch
from torch import nn
from torch.utils.data import DataLoader

from kron import distributed, measure
from kron.data import build_datasets, build_loader
from kron.distributed import DistContext
from kron.errors import ConfigError, KronError, OutputFolderError, one_line
from kron.fileio import atomic_write_text, disk_error, remove_stale_temps
from kron.layers.errors import FactorizationError
from kron.models import build_model_from_config
from kron.models.surgery import SurgeryRow, apply_surgery, format_table
from kron.recipe.checkpoint import CKPT_NAME, TrainState, load_checkpoint, run_marker
from kron.recipe.settings import (
    DataSettings,
    MeasureSettings,
    ModelSettings,
    PlaceSettings,
    RunSettings,
    SetupSettings,
)
from kron.runtime import JobSettings, configure_allocator, job_scope, launch_record

RESULTS_NAME = "results.json"
RECORD_DIR = ".hydra"
LOG_NAME = "train.log"


# ----------------------------------------------------------------------------- set up
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


@dataclass
class RunRecord:
    """What a run writes about itself once it holds its folder.

    ``files``: name -> YAML text for ``.hydra/`` (empty outside Hydra; Hydra's own record is
    off in configs/train.yaml, so a run refused because its folder is in use writes nothing).
    ``search_root``: the folder ``resume=true`` may search beyond the run folder (the folder of
    the day folders, or the sweep folder); None: only the run folder. See docs/design.md, D8.
    """

    files: dict[str, str] = field(default_factory=dict)
    search_root: Path | None = None


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


def shared_run_dir(out_dir: Path, ctx: DistContext) -> Path:
    """Rank 0's run folder on every rank (each torchrun process gets its own Hydra folder; the
    unused ones, empty or holding only Hydra's files, are removed)."""
    shared = Path(distributed.broadcast_object(str(out_dir)))
    if shared != out_dir and out_dir.is_dir() and {
            p.name for p in out_dir.iterdir()} <= {RECORD_DIR, LOG_NAME}:
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
    record (``.hydra/`` files) written, each atomically."""
    with run_marker(run_dir), run_log(run_dir):
        for p in remove_stale_temps(run_dir):
            print(f"removed {p} (left by a killed writer)")
        for name, text in record.files.items():
            atomic_write_text(run_dir / RECORD_DIR / name, text)
        yield


def wants_cuda(device: str) -> bool:
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


@contextmanager
def start_job(s: SetupSettings, out_dir: str | Path, record: RunRecord | None = None
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
    cuda = wants_cuda(s.device)
    settings = JobSettings(seed=s.seed, deterministic=s.deterministic, cuda=cuda,
                           threads=s.threads)
    with job_scope(settings) as notes:
        try:
            ctx = distributed.init_distributed("cuda" if cuda else "cpu")
            run_dir = shared_run_dir(Path(out_dir), ctx)
            if s.batch_size % ctx.world_size:
                raise ConfigError(f"batch_size={s.batch_size} must divide by the "
                                  f"{ctx.world_size} processes; pick a multiple of it")
            make_run_dir(run_dir)
            amp = cuda and s.amp
            channels_last = cuda if s.channels_last == "auto" else bool(s.channels_last)
            job = Job(run_dir, ctx, getattr(torch, s.amp_dtype) if amp else None,
                      channels_last, allocator, list(notes))
            with hold_run_dir(run_dir, record or RunRecord()) if ctx.is_main else nullcontext():
                for line in notes if ctx.is_main else []:
                    print(line, flush=True)
                yield job
        finally:
            distributed.cleanup()


# ----------------------------------------------------------------------------- model
@dataclass
class Net:
    """The model as training calls it (``model``: maybe compiled, maybe DDP) and as it is saved
    and measured (``raw``), what surgery changed, and how to build the dense twin."""

    model: nn.Module
    raw: nn.Module
    rows: list[SurgeryRow]
    build_dense: Callable[[], nn.Module]
    plan: dict[str, Any] = field(default_factory=dict)


def layers_spec(s: ModelSettings) -> dict[str, dict]:
    """The surgery spec of ``s.layers``, with ``s.implementation`` (if set) on every Kronecker
    entry."""
    spec = copy.deepcopy(s.layers)
    if s.implementation:
        for entry in spec.values():
            if entry.get("kind") == "kron":  # no kind: surgery refuses it in one line
                entry["implementation"] = s.implementation
    return spec


def surgered_model(s: ModelSettings) -> tuple[nn.Module, list[SurgeryRow],
                                              Callable[[], nn.Module]]:
    """The dense baseline (with ``init_from``'s weights, if given) with ``s.layers`` swapped
    in; the surgery rows; and a builder of the dense twin (same seed-free architecture)."""
    channels, size, _ = s.shape

    def build_dense() -> nn.Module:
        return build_model_from_config(s.model, s.num_classes, channels, size)

    model = build_dense()
    if s.init_from:  # a trained dense run to fit `init: dense` layers from
        src = Path(hydra.utils.to_absolute_path(str(s.init_from)))
        model.load_state_dict(load_checkpoint(src / CKPT_NAME if src.is_dir() else src)["model"])
    # layers_strict: refuse the run when a matched layer cannot meet its entry, instead of
    # leaving it dense and reporting it in the surgery table
    rows = apply_surgery(model, layers_spec(s), (1, *s.shape), strict=s.layers_strict)
    return model, rows, build_dense


def plan_layers(model: nn.Module, job: Job, shape: tuple[int, int, int], batch: int
                ) -> dict[str, str]:
    """Pin every ``auto`` Kronecker layer to the implementation measured fastest for a training
    step at this job's batch (``kron.planning.plan``: rank 0 measures, every rank receives the
    same plan). The measuring forward leaves no trace: buffers (BatchNorm statistics) and the
    RNG streams are put back. The plan is recorded in results.json, never in checkpoints."""
    from kron.planning import apply_plan, plan

    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    devices = [job.device] if job.cuda else []
    with torch.random.fork_rng(devices=devices):
        plan_ = plan(model, job.to_device(torch.randn(batch, *shape)), training=True)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    apply_plan(model, plan_)
    return plan_


def place_model(s: PlaceSettings, job: Job, raw: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``raw`` on the job's device (channels_last if asked), SyncBatchNorm under multi-GPU DDP,
    compiled if asked, DDP-wrapped when there are several processes. Returns (model, raw)."""
    raw.to(job.device)
    if job.channels_last:
        raw.to(memory_format=torch.channels_last)
    if job.dist.is_distributed and job.cuda and s.sync_bn:
        raw = nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    model = torch.compile(raw) if s.compile else raw
    if job.dist.is_distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[job.device.index] if job.cuda else None)
    return model, raw


def build_net(s: ModelSettings, p: PlaceSettings, job: Job) -> Net:
    """Build, surger, (optionally) plan and place the model. Every rank builds it from the same
    seed; afterwards each rank's torch RNG moves to its own seed (dropout differs per rank).
    A model or ``layers=`` spec that cannot be built is one :class:`ConfigError`."""
    try:
        raw, rows, build_dense = surgered_model(s)
    except (KronError, FactorizationError):
        raise
    except ValueError as err:  # surgery and the model builders refuse a spec with ValueError
        raise ConfigError(one_line(err)) from err
    if job.is_main:
        print(format_table(rows) if rows else "(no layers swapped: dense baseline)")
    model, raw = place_model(p, job, raw)
    plan = plan_layers(raw, job, s.shape, p.batch_size // job.world) if p.plan_layers else {}
    torch.manual_seed(distributed.seed_for_rank(p.seed, job.rank))
    return Net(model, raw, rows, build_dense, plan)


# ----------------------------------------------------------------------------- data
@dataclass
class Data:
    """This rank's training and test loaders, and what the model needs to know of the data."""

    train: DataLoader
    test: DataLoader
    num_classes: int
    shape: tuple[int, int, int]  # (channels, height, width) of one input

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train)


def build_data(s: DataSettings, job: Job) -> Data:
    """Datasets from the data config and loaders from its ``loader`` options: ``batch_size`` is
    the global batch (``batch_size / world`` per process)."""
    train_set, test_set = build_datasets(s.config)
    common = dict(seed=s.seed, rank=job.rank, world=job.world, device=job.device)
    train = build_loader(train_set, s.config["loader"], batch_size=s.batch_size // job.world,
                         train=True, **common)
    test = build_loader(test_set, s.config["loader"], train=False,
                        batch_size=s.eval_batch_size or s.batch_size, **common)
    if len(train) == 0:
        raise ConfigError(f"batch_size={s.batch_size} exceeds the {len(train_set)} training "
                          "images; pick a smaller batch_size")
    return Data(train, test, s.num_classes, s.shape)


# ----------------------------------------------------------------------------- measure
def _speed(s: MeasureSettings, job: Job, model: nn.Module, dense: nn.Module,
           shape: tuple[int, int, int]) -> dict[str, Any]:
    """Latency at ``s.batch_size`` and (when set) throughput at ``s.throughput_batch_size``, in
    the job's compute dtype (bf16/fp16 under AMP on CUDA), both against the dense twin, timed
    as docs/design.md, D5 says."""
    threads = torch.get_num_threads()
    if s.threads:  # e.g. 1 on a busy machine, where spinning OpenMP threads stall
        torch.set_num_threads(int(s.threads))
    try:
        return measure.measure_speed(
            model, dense, shape, job.device, dtype=job.amp_dtype or torch.float32,
            latency_batch=s.batch_size, throughput_batch=s.throughput_batch_size,
            warmup=s.warmup, repeats=s.repeats, channels_last=job.channels_last)
    finally:
        torch.set_num_threads(threads)


def measure_against_dense(s: MeasureSettings, job: Job, net: Net, shape: tuple[int, int, int]
                          ) -> dict[str, Any]:
    """Params, MACs per image and (if ``s.enabled``) latency of the trained net and of its
    dense twin, built fresh on the same device."""
    model = net.raw
    dense = net.build_dense().to(job.device)
    if job.channels_last:
        dense.to(memory_format=torch.channels_last)
    one = (1, *shape)
    out: dict[str, Any] = {
        "params": measure.count_params(model), "params_dense": measure.count_params(dense),
        "macs_executed": measure.count_macs(model, one),
        "macs_dense": measure.count_macs(dense, one)}
    # the surgered layers' formula count (what FlopCounterMode saw may be a dense path)
    out["macs_analytic"] = measure.surgered_macs(out["macs_dense"],
                                                 [r.as_dict() for r in net.rows])
    out["param_ratio"] = out["params"] / out["params_dense"]
    out["mac_ratio"] = out["macs_executed"] / out["macs_dense"]
    if s.enabled:
        out.update(_speed(s, job, model, dense, shape))
    else:
        out.update(latency_ms=None, latency_dense_ms=None, speedup=None)
    return out


# ----------------------------------------------------------------------------- write results
def git_commit() -> str | None:
    """The kron checkout's commit (for the tables' provenance), or None outside git."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def results_record(run: RunSettings, job: Job, net: Net, state: TrainState,
                   measured: dict[str, Any]) -> dict[str, Any]:
    """Everything ``results.json`` holds (its one writer; the W&B summary gets the same): the
    measurement, the final test metrics, the history, what surgery changed, the layer plan,
    and where and how the run ran. Schema: docs/design.md, D6 and D8."""
    final = state.history[-1] if state.history else {}
    seconds = sum(h.get("train_seconds", 0.0) for h in state.history)
    images = sum(h.get("train_images_per_s", 0.0) * h.get("train_seconds", 0.0)
                 for h in state.history)
    acc1 = final.get("test_acc1")
    return {
        **measured,
        "test_acc1": acc1, "test_err1": None if acc1 is None else 100 - acc1,
        "test_acc5": final.get("test_acc5") if run.data.num_classes > 10 else None,
        "test_loss": final.get("test_loss"),
        "train_images_per_s": images / seconds if seconds else None,
        "epochs_done": len(state.history), "history": state.history,
        "surgery": [r.as_dict() for r in net.rows], "layer_plan": net.plan,
        "world_size": job.world, **launch_record(), "device": str(job.device),
        "allocator": job.allocator,
        "notes": job.notes, "wandb_id": state.wandb_id, "run_dir": str(job.out_dir),
        "git_commit": git_commit(), "torch_version": torch.__version__,
        "config": run.config, "overrides": list(run.overrides),
    }


def write_results(job: Job, results: dict[str, Any]) -> Path:
    """``results.json`` in the run folder (atomic), and its scalar fields printed."""
    path = job.out_dir / RESULTS_NAME
    atomic_write_text(path, json.dumps(results, indent=2, default=str))
    print(f"results: {path}")
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, (dict, list))},
                     indent=1))
    return path
