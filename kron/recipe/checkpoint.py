"""Checkpoints and resume: what is saved, how a run is found again, and which runs are live.

A checkpoint (``last.pt``, written atomically at the end of every epoch) holds only tensors and
primitive containers, so ``torch.load(weights_only=True)`` reads it: the model and optimizer
state, the grad scaler, the epoch and step, the history, every rank's RNG state, the W&B id and
the resolved config as YAML with the hash of what must match to resume it (kron/recipe/identity.py).
A run folder holds ``RUNNING.json`` (host and pid) while its job runs; ``resume=true`` never
picks a folder whose job is still alive. See docs/design.md, D6 and D8.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from kron.errors import CheckpointError, OutputFolderError
from kron.fileio import atomic_write_stream, atomic_write_text

CKPT_NAME = "last.pt"
MARKER_NAME = "RUNNING.json"


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
