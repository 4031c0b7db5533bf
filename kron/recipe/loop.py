"""Step 4 of the recipe: one training epoch, evaluation, and ``fit`` over the epochs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from kron import distributed
from kron.data import set_epoch
from kron.recipe.checkpoint import CKPT_NAME, TrainState, rng_state, save_checkpoint
from kron.recipe.data import Data
from kron.recipe.identity import config_hash
from kron.recipe.model import Net
from kron.recipe.optim import lr_at
from kron.recipe.setup import Job


def _all_reduce(t: torch.Tensor, job: Job) -> torch.Tensor:
    if job.dist.is_distributed:
        dist.all_reduce(t)
    return t


def train_one_epoch(cfg: DictConfig, job: Job, data: Data, net: Net,
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    state: TrainState) -> dict[str, float]:
    """One pass over this rank's shard; updates ``state.step``. Returns the epoch's mean
    training loss (over all ranks), last learning rate and images per second. The host waits
    for the device only at the end (and every ``log_every`` steps while a progress bar shows)."""
    total = cfg.epochs * data.steps_per_epoch
    base_lr = float(cfg.optimizer.lr)
    net.model.train()
    set_epoch(data.train, state.epoch)
    t0, loss_sum, lr = time.perf_counter(), torch.zeros((), device=job.device), base_lr
    bar = tqdm(data.train, desc=f"epoch {state.epoch + 1}/{cfg.epochs}", leave=False,
               disable=not (job.is_main and cfg.progress), dynamic_ncols=True)
    for x, y in bar:
        lr = lr_at(state.step, total, base_lr, cfg.scheduler)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = job.to_device(x), y.to(job.device, non_blocking=True)
        with job.autocast():
            loss = F.cross_entropy(net.model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(net.raw.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        state.step += 1
        loss_sum += loss.detach()
        if not bar.disable and state.step % cfg.log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}")
    loss_mean = _all_reduce(loss_sum / data.steps_per_epoch, job).item() / job.world
    seconds = time.perf_counter() - t0  # .item() above waited for the device
    images = data.steps_per_epoch * cfg.batch_size
    return {"train_loss": loss_mean, "lr": lr, "train_images_per_s": images / seconds,
            "train_seconds": seconds}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, job: Job, num_classes: int) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean loss over every rank's shard of the test set.

    Counts accumulate on the device; the host reads them once, at the end."""
    was_training = model.training
    model.eval()
    k = min(5, num_classes)
    stats = torch.zeros(4, dtype=torch.float64, device=job.device)  # n, top1, topk, loss sum
    for x, y in loader:
        x, y = job.to_device(x), y.to(job.device, non_blocking=True)
        with job.autocast():
            logits = model(x).float()
        hit = logits.topk(k, dim=1).indices == y[:, None]
        stats += torch.stack([torch.tensor(len(y), device=job.device), hit[:, 0].sum(),
                              hit.any(1).sum(), F.cross_entropy(logits, y, reduction="sum")]
                             ).to(torch.float64)
    n, top1, topk, loss = _all_reduce(stats, job).tolist()
    model.train(was_training)
    n = max(n, 1)
    return {"acc1": 100 * top1 / n, "acc5": 100 * topk / n, "loss": loss / n}


def checkpoint(cfg: DictConfig, job: Job, net: Net, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, state: TrainState) -> None:
    """Every rank's RNG streams gathered, then rank 0 writes ``last.pt`` atomically."""
    states = distributed.all_gather_objects(rng_state(job.device))
    if job.is_main:
        save_checkpoint(job.out_dir / CKPT_NAME, model=net.raw.state_dict(),
                        optimizer=optimizer.state_dict(),
                        scaler=scaler.state_dict() if scaler.is_enabled() else {},
                        epoch=state.epoch, step=state.step, history=state.history, rng=states,
                        world_size=job.world, wandb_id=state.wandb_id,
                        config=OmegaConf.to_yaml(cfg, resolve=True),
                        config_hash=config_hash(OmegaConf.to_container(cfg, resolve=True)))
    distributed.barrier()


def fit(cfg: DictConfig, job: Job, data: Data, net: Net, optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler, state: TrainState,
        log: Callable[[dict[str, Any]], None]) -> bool:
    """Train from ``state.epoch`` to ``cfg.epochs``: evaluate every ``eval_every`` epochs and
    after the last, record and ``log`` each epoch, checkpoint after each. Returns False when
    ``stop_after_epochs`` cut it short (as if killed), else True."""
    eval_model = net.model.module if job.dist.is_distributed else net.model  # no DDP sync
    while state.epoch < cfg.epochs:
        record: dict[str, Any] = train_one_epoch(cfg, job, data, net, optimizer, scaler, state)
        state.epoch += 1
        if state.epoch == cfg.epochs or state.epoch % cfg.eval_every == 0:
            ev = evaluate(eval_model, data.test, job, data.num_classes)
            record.update({f"test_{k}": v for k, v in ev.items()})
        record = {"epoch": state.epoch, **record}
        state.history.append(record)
        log(record)
        checkpoint(cfg, job, net, optimizer, scaler, state)
        if cfg.stop_after_epochs and state.epoch >= cfg.stop_after_epochs:
            if job.is_main:
                print(f"stop_after_epochs={cfg.stop_after_epochs}: stopping (as if killed)")
            return False
    return True
