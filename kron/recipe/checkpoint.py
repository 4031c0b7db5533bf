"""Checkpoints, resume and run integrity: what is saved, how a run is found again, which runs
are live, and which checkpoints belong to this run.

A checkpoint (``last.pt``, written atomically at the end of every epoch by :func:`save_run`)
holds only tensors and primitive containers, so ``torch.load(weights_only=True)`` reads it: the
model and optimizer state, the grad scaler, the epoch and step, the history, every rank's RNG
state, the W&B id and the resolved config as YAML with :func:`config_hash` of what must match to
resume it (:func:`identity`). A run folder holds ``RUNNING.json`` (host and pid) while its job
runs; ``resume=true`` never picks a folder whose job is still alive.

``resume=true`` looks in this run's folder, then under the run's search root (the folder that
holds the day folders, ``outputs/runs`` by default, or the multirun's sweep folder; never above
it) for the newest checkpoint whose stored config matches this run's and whose job is not
running. ``resume=PATH`` takes that checkpoint, but only if it belongs to this run, unless
``resume_force=true``. Every refusal is one :class:`CheckpointError` line. See
docs/design.md, D6 and D8.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import numpy as np
import torch
from omegaconf import OmegaConf

from kron import distributed
from kron.errors import CheckpointError, OutputFolderError
from kron.fileio import atomic_write_stream, atomic_write_text
from kron.recipe.settings import ResumeSettings
from kron.tables.run import ABSENT
from kron.tables.run import comparable_config as tables_comparable
from kron.tables.run import first_difference as first_leaf_difference

if TYPE_CHECKING:  # the steps and the fit import this module, not the other way round
    from kron.recipe.fit import Training
    from kron.recipe.steps import Job

CKPT_NAME = "last.pt"
MARKER_NAME = "RUNNING.json"
REQUIRED = ("model", "optimizer", "epoch", "step", "history", "rng")
#: top-level keys a resumed run may change: when it stops, where it runs, what it reports
IGNORED = ("stop_after_epochs", "resume_force", "device", "threads", "eval_batch_size",
           "measure", "wandb")


@dataclass
class TrainState:
    """Where training stands: epochs done, optimizer steps, per-epoch records, the W&B run."""

    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    wandb_id: str | None = None


# ----------------------------------------------------------------------------- RNG states
def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG streams as tensors and primitives (``weights_only``-loadable): torch
    CPU, this process's CUDA device (if it uses one), numpy, Python."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> str | None:
    """Restore one process's RNG streams; returns a note when the CUDA stream cannot be."""
    torch.set_rng_state(state["torch"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    random.setstate((state["python_version"], tuple(state["python"]), None))
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # checkpoints before one-device states: every device's state
        cuda = cuda[0] if cuda else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)
    elif cuda is not None or device.type == "cuda":
        return "CUDA RNG state not restored (saved and resumed on different device types)"
    return None


def restore_rng(states: list[dict[str, Any]], rank: int, world: int,
                device: torch.device) -> str | None:
    """Give rank ``rank`` its saved RNG streams; one line saying what could not be restored.

    On another number of processes, ranks beyond the saved ones keep their fresh seeds. Data
    order and augmentation do not depend on these streams (they follow seed, epoch and sample),
    only model-side randomness such as dropout does.
    """
    notes = []
    if rank < len(states):
        note = set_rng_state(states[rank], device)
        if note:
            notes.append(note)
    if len(states) != world:
        kept = min(world, len(states))
        line = (f"checkpoint from {len(states)} processes resumed on {world}: model, optimizer "
                f"and RNG streams of ranks 0-{kept - 1} restored")
        line += (f", RNG streams of saved ranks {world}-{len(states) - 1} dropped"
                 if len(states) > world else
                 f", ranks {len(states)}-{world - 1} keep their own fresh seeds")
        notes.insert(0, line + " (data order and augmentation follow seed, epoch and sample)")
    return "resume: " + "; ".join(notes) if notes else None


# ----------------------------------------------------------------------------- save / load
def save_checkpoint(path: Path, **content: Any) -> None:
    """Write ``content`` to ``path`` atomically and durably (a reader never sees half a
    checkpoint; a full disk is one line naming ``path``)."""
    atomic_write_stream(path, lambda f: torch.save(content, f))


def load_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint on the CPU (``mmap``: tensors stay on disk until used, for reading
    only its config). A truncated, empty or foreign file is one :class:`CheckpointError`."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except Exception as err:  # noqa: BLE001 - zip, pickle and EOF errors alike: unreadable
        raise CheckpointError(f"cannot read checkpoint {path} ({_why_unreadable(path, err)}); "
                              "it is truncated or not a kron checkpoint: delete it or resume "
                              "from another") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a kron checkpoint (a {type(ckpt).__name__}, not "
                              "a dict); resume from a last.pt that kron.train wrote")
    return ckpt


def _why_unreadable(path: Path, err: BaseException) -> str:
    """The reader's complaint, first sentence only (torch's zip reader adds a paragraph)."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
    except OSError:
        pass
    first = " ".join(str(err).split()).split(". ")[0]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def checkpoint_config(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The resolved config a checkpoint was trained with, or None (written before configs
    were stored, or unreadable)."""
    text = ckpt.get("config")
    if not isinstance(text, str):
        return None
    try:
        cfg = OmegaConf.to_container(OmegaConf.create(text), resolve=True)
    except Exception:  # noqa: BLE001 - a config we cannot parse counts as none
        return None
    return cfg if isinstance(cfg, dict) else None


# ----------------------------------------------------------------------------- live runs
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def running_elsewhere(folder: Path) -> str | None:
    """Why ``folder``'s job counts as still running (one line), or None when it does not.

    A marker from this host counts only while its process lives (a killed job leaves its
    marker behind); one from another host counts, as this host cannot tell (delete the file
    once that job is gone).
    """
    f = folder / MARKER_NAME
    try:
        info = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    host, pid = info.get("host"), int(info.get("pid", -1))
    if host == socket.gethostname() and (pid == os.getpid() or not _alive(pid)):
        return None
    return f"{folder} is in use by pid {pid} on {host} (delete {f} if that job is gone)"


@contextmanager
def run_marker(folder: Path) -> Iterator[None]:
    """Mark ``folder`` as running for the duration of the block (rank 0 only)."""
    busy = running_elsewhere(folder)
    if busy:
        raise OutputFolderError(f"run folder {busy}; use another hydra.run.dir")
    marker = folder / MARKER_NAME
    atomic_write_text(marker, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                          "started": time.strftime("%Y-%m-%dT%H:%M:%S")}))
    try:
        yield
    finally:
        marker.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- run identity
def identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a resolved config (plain dict) that must match for a resume: the config as
    the tables compare it to decide whether a record is current
    (:func:`kron.tables.run.comparable_config`, reused: data loading, resume, progress and
    logging aside), less ``IGNORED`` (when the run stops, where it runs, what it reports). The
    optimizer is part of it."""
    view = tables_comparable(dict(config))
    for key in IGNORED:
        view.pop(key, None)
    return view


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 of :func:`identity` (stable: sorted keys, JSON)."""
    text = json.dumps(identity(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _show(v: Any) -> str:
    return "(absent)" if v is ABSENT else json.dumps(v, default=str)


def first_difference(saved: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
    """The first identity key whose value differs between two resolved configs, phrased as
    ``key=<saved> in the checkpoint, <now> here``; None when they match."""
    hit = first_leaf_difference(identity(saved), identity(now))
    if hit is None:
        return None
    key, va, vb = hit
    return f"{key}={_show(va)} in the checkpoint, {_show(vb)} here"


# ----------------------------------------------------------------------------- resume
def _explicit(resume: Any) -> Path:
    p = Path(hydra.utils.to_absolute_path(str(resume)))
    p = p / CKPT_NAME if p.is_dir() else p
    if not p.is_file():
        raise CheckpointError(f"resume={resume}: no checkpoint at {p} (give a {CKPT_NAME} or "
                              "a run folder holding one)")
    return p


def _belongs(path: Path, config: dict[str, Any]) -> bool:
    """Whether the checkpoint at ``path`` was trained with this run's config (read without
    loading its tensors); unreadable or config-less checkpoints do not count."""
    try:
        saved = checkpoint_config(load_checkpoint(path, mmap=True))
    except CheckpointError as err:
        print(f"resume=true: skipping {err}")
        return False
    return saved is not None and first_difference(saved, config) is None


def find_resume(resume: Any, out_dir: Path, config: dict[str, Any],
                search_root: Path | None = None) -> Path | None:
    """The checkpoint to resume from: an explicit file/folder; or, with ``resume=true``, this
    run's own ``last.pt``, else the newest one under ``search_root`` whose stored config
    matches ``config`` (resolved, plain) and whose job is not running. Prints why it skips
    live runs and where it looked when it finds none."""
    if resume in (None, False, "false", "False", ""):
        return None
    if resume not in (True, "true", "True"):
        return _explicit(resume)
    if (out_dir / CKPT_NAME).is_file():
        return out_dir / CKPT_NAME
    if search_root is None:
        print(f"resume=true: no {CKPT_NAME} in {out_dir}; starting fresh")
        return None
    found = sorted((p for p in Path(search_root).rglob(CKPT_NAME) if p.parent != out_dir),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    for ckpt in found:
        busy = running_elsewhere(ckpt.parent)
        if busy:
            print(f"resume=true: skipping {busy}")
        elif _belongs(ckpt, config):
            return ckpt
    print(f"resume=true: no earlier checkpoint of this run (same config) under {search_root} "
          f"({len(found)} other checkpoints there); starting fresh")
    return None


def check_belongs(path: Path, ckpt: dict[str, Any], s: ResumeSettings, job: Job) -> bool:
    """Refuse (one line) a checkpoint of another run unless ``resume_force``; warn when it
    holds no config to check. Returns whether its optimizer state may be loaded."""
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a kron checkpoint (no {missing[0]!r}); resume "
                              f"from a {CKPT_NAME} that kron.train wrote")
    saved = checkpoint_config(ckpt)
    if saved is None:
        job.say(f"resume: warning: {path} holds no config (written by an older kron), so it "
                "could not be checked to belong to this run")
        return True
    diff = first_difference(saved, s.config)
    if diff is None:
        return True
    if not s.force:
        raise CheckpointError(f"resume: {path} is another run's checkpoint: {diff}; resume a "
                              "checkpoint of this run, or pass resume_force=true to load it "
                              "anyway")
    job.say(f"resume_force: loading {path} although {diff}")
    # `saved` may come from an older kron: its keys are not guaranteed
    same_opt = saved.get("optimizer", {}).get("_target_") == s.config["optimizer"]["_target_"]
    if not same_opt:
        job.say("resume_force: the checkpoint's optimizer differs: optimizer state not restored")
    return same_opt


def _model_mismatch(model: torch.nn.Module, saved: dict[str, Any]) -> str | None:
    """The first parameter or buffer of ``model`` that ``saved`` lacks, adds or shapes
    differently (one phrase), or None."""
    mine = model.state_dict()
    for key in [*mine, *(k for k in saved if k not in mine)]:
        a, b = mine.get(key), saved.get(key)
        if a is None or b is None:
            return f"{key} is {'only in the checkpoint' if a is None else 'not in it'}"
        if torch.is_tensor(a) and torch.is_tensor(b) and a.shape != b.shape:
            return f"{key} has shape {list(b.shape)} there, {list(a.shape)} here"
    return None


def load_into(path: Path, ckpt: dict[str, Any], training: Training, with_optimizer: bool
              ) -> None:
    """Load model, optimizer and scaler state; a mismatch is one :class:`CheckpointError`."""
    mismatch = _model_mismatch(training.net.raw, ckpt["model"])
    if mismatch:
        raise CheckpointError(f"resume: the model in {path} does not fit this one ({mismatch}); "
                              "resume with the layers and model it was trained with")
    training.net.raw.load_state_dict(ckpt["model"])
    try:
        if with_optimizer:
            training.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            training.scaler.load_state_dict(ckpt["scaler"])
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"resume: the optimizer state in {path} does not fit this "
                              f"optimizer ({' '.join(str(err).split())[:160]}); resume with the "
                              "optimizer it was trained with") from None


def resume_state(s: ResumeSettings, job: Job, training: Training,
                 search_root: Path | None = None) -> TrainState:
    """A fresh :class:`TrainState`, or the one of the checkpoint ``s.resume`` points to with
    ``training``'s model, optimizer, scaler and this rank's RNG streams restored. A checkpoint from
    another number of processes restores everything but the RNG streams of missing ranks, and
    says so in one line."""
    found: tuple[str | None, str | None] = (None, None)
    if job.is_main:
        try:
            path = find_resume(s.resume, job.out_dir, s.config, search_root)
            found = (None if path is None else str(path), None)
        except CheckpointError as err:
            found = (None, str(err))
    where, error = distributed.broadcast_object(found)  # rank 0 decides: every rank the same
    if error:
        raise CheckpointError(error)
    if where is None:
        return TrainState()
    path = Path(where)
    ckpt = load_checkpoint(path)
    load_into(path, ckpt, training, check_belongs(path, ckpt, s, job))
    note = restore_rng(list(ckpt["rng"]), job.rank, job.world, job.device)
    if note:
        job.say(note)
    if job.is_main:
        print(f"resumed from {path} at epoch {ckpt['epoch']}")
    return TrainState(int(ckpt["epoch"]), int(ckpt["step"]), list(ckpt["history"]),
                      ckpt.get("wandb_id"))


def save_run(job: Job, training: Training, config: dict[str, Any]) -> None:
    """The end-of-epoch checkpoint: every rank's RNG streams gathered, then rank 0 writes
    ``last.pt`` atomically with the resolved ``config`` and its :func:`config_hash`."""
    states = distributed.all_gather_objects(rng_state(job.device))
    if job.is_main:
        state, scaler = training.state, training.scaler
        save_checkpoint(job.out_dir / CKPT_NAME, model=training.net.raw.state_dict(),
                        optimizer=training.optimizer.state_dict(),
                        scaler=scaler.state_dict() if scaler.is_enabled() else {},
                        epoch=state.epoch, step=state.step, history=state.history, rng=states,
                        world_size=job.world, wandb_id=state.wandb_id,
                        config=OmegaConf.to_yaml(config), config_hash=config_hash(config))
    distributed.barrier()
