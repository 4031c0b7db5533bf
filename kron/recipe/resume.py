"""Resuming: find the checkpoint of this run, check that it is one, load it into this job.

``resume=true`` looks in this run's folder, then under the run's search root (the folder that
holds the day folders, ``outputs/runs`` by default, or the multirun's sweep folder; never above
it) for the newest checkpoint whose stored config matches this run's (kron/recipe/identity.py)
and whose job is not running. ``resume=PATH`` takes that checkpoint, but only if it belongs to
this run, unless ``resume_force=true``. Every refusal is one :class:`CheckpointError` line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from kron import distributed
from kron.errors import CheckpointError
from kron.recipe.checkpoint import (
    CKPT_NAME,
    TrainState,
    checkpoint_config,
    load_checkpoint,
    restore_rng,
    running_elsewhere,
)
from kron.recipe.identity import first_difference
from kron.recipe.model import Net
from kron.recipe.setup import Job

REQUIRED = ("model", "optimizer", "epoch", "step", "history", "rng")


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


def check_belongs(path: Path, ckpt: dict[str, Any], cfg: DictConfig, job: Job) -> bool:
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
    diff = first_difference(saved, OmegaConf.to_container(cfg, resolve=True))
    if diff is None:
        return True
    if not cfg.resume_force:
        raise CheckpointError(f"resume: {path} is another run's checkpoint: {diff}; resume a "
                              "checkpoint of this run, or pass resume_force=true to load it "
                              "anyway")
    job.say(f"resume_force: loading {path} although {diff}")
    same_opt = saved.get("optimizer", {}).get("_target_") == cfg.optimizer.get("_target_")
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


def load_into(path: Path, ckpt: dict[str, Any], net: Net, optimizer: torch.optim.Optimizer,
              scaler: torch.amp.GradScaler, with_optimizer: bool) -> None:
    """Load model, optimizer and scaler state; a mismatch is one :class:`CheckpointError`."""
    mismatch = _model_mismatch(net.raw, ckpt["model"])
    if mismatch:
        raise CheckpointError(f"resume: the model in {path} does not fit this one ({mismatch}); "
                              "resume with the layers and model it was trained with")
    net.raw.load_state_dict(ckpt["model"])
    try:
        if with_optimizer:
            optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"resume: the optimizer state in {path} does not fit this "
                              f"optimizer ({' '.join(str(err).split())[:160]}); resume with the "
                              "optimizer it was trained with") from None


def resume_state(cfg: DictConfig, job: Job, net: Net, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, search_root: Path | None = None) -> TrainState:
    """A fresh :class:`TrainState`, or the one of the checkpoint ``cfg.resume`` points to with
    the model, optimizer, scaler and this rank's RNG streams restored. A checkpoint from
    another number of processes restores everything but the RNG streams of missing ranks, and
    says so in one line."""
    found: tuple[str | None, str | None] = (None, None)
    if job.is_main:
        try:
            path = find_resume(cfg.resume, job.out_dir,
                               OmegaConf.to_container(cfg, resolve=True), search_root)
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
    load_into(path, ckpt, net, optimizer, scaler, check_belongs(path, ckpt, cfg, job))
    note = restore_rng(list(ckpt["rng"]), job.rank, job.world, job.device)
    if note:
        job.say(note)
    if job.is_main:
        print(f"resumed from {path} at epoch {ckpt['epoch']}")
    return TrainState(int(ckpt["epoch"]), int(ckpt["step"]), list(ckpt["history"]),
                      ckpt.get("wandb_id"))
