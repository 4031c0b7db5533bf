"""Resuming: load what a checkpoint holds into this job, and say what could not be restored."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from kron import distributed
from kron.recipe.checkpoint import TrainState, find_resume, load_checkpoint, restore_rng
from kron.recipe.model import Net
from kron.recipe.setup import Job


def resume_state(cfg: DictConfig, job: Job, net: Net, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, overrides: list[str]) -> TrainState:
    """A fresh :class:`TrainState`, or the one of the checkpoint ``cfg.resume`` points to with
    the model, optimizer, scaler and this rank's RNG streams restored. A checkpoint from
    another number of processes restores everything but the RNG streams of missing ranks, and
    says so in one line."""
    path = find_resume(cfg.resume, job.out_dir, overrides) if job.is_main else None
    path = distributed.broadcast_object(path)  # rank 0 decides: every rank resumes the same
    if path is None:
        return TrainState()
    ckpt = load_checkpoint(path)
    net.raw.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    note = restore_rng(list(ckpt["rng"]), job.rank, job.world, job.device)
    if note:
        job.say(note)
    if job.is_main:
        print(f"resumed from {path} at epoch {ckpt['epoch']}")
    return TrainState(int(ckpt["epoch"]), int(ckpt["step"]), list(ckpt["history"]),
                      ckpt.get("wandb_id"))
