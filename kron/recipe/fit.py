"""The fit: the optimizer, the learning-rate schedule, the epochs, evaluation and the W&B log.

:func:`fit` trains from where :class:`Training` stands (fresh or resumed) to ``epochs``: each
epoch is one pass over this rank's shard, then an evaluation (every ``eval_every`` epochs and
after the last), the epoch's record logged (:class:`RunLog`: printed, and sent to W&B whose
summary carries the same fields as ``results.json``), and a checkpoint
(kron/recipe/checkpoint.py).

Weight decay goes on weights only: biases and normalisation parameters (scales and shifts)
never decay, as they set offsets and scales that decay would pull towards zero for no
regularisation gain. Kronecker factors decay by default (``optimizer.decay_kron_factors:
true``): they are the layer's weights, the dense twin's weights decay too, and L2 on A and B
bounds ``||A||^2 + ||B||^2 >= 2 ||A (x) B||``, so it regularises each term's norm and keeps the
scale split between A and B balanced (without it, ``cA (x) B/c`` can drift). Set it false to
train factors without decay. See docs/design.md, D6 and D8.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import hydra
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from kron.config_schema import OPTIMIZER_META
from kron.data import set_epoch
from kron.layers import KronConv2d, KronLinear
from kron.recipe.checkpoint import TrainState, save_run
from kron.recipe.settings import FitSettings, WandbSettings
from kron.recipe.steps import Data, Job, Net

NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


@dataclass
class Training:
    """What the fit changes and a checkpoint holds: the net, its optimizer and grad scaler
    (float16 autocast only), and where training stands."""

    net: Net
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    state: TrainState = field(default_factory=TrainState)


# ----------------------------------------------------------------------------- optimizer
def param_groups(model: nn.Module, weight_decay: float, decay_kron_factors: bool
                 ) -> list[dict[str, Any]]:
    """The trainable parameters split into ``decay`` and ``no_decay`` groups (named, so a
    checkpoint or a log can say which is which); empty groups are left out."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        kron = isinstance(module, (KronLinear, KronConv2d))
        params = module.named_parameters(recurse=kron)
        for name, p in params:
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            is_bias = name.rsplit(".", 1)[-1] == "bias"
            keep = (isinstance(module, NORMS) or is_bias
                    or (kron and not decay_kron_factors))
            (no_decay if keep else decay).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": float(weight_decay)},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(opt_cfg: Mapping[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``opt_cfg._target_`` names, with the config's arguments, over
    :func:`param_groups` of ``model``."""
    cls = hydra.utils.get_class(opt_cfg["_target_"])
    kwargs = {k: v for k, v in opt_cfg.items() if k not in OPTIMIZER_META}
    weight_decay = float(kwargs.pop("weight_decay", 0.0))
    groups = param_groups(model, weight_decay, bool(opt_cfg["decay_kron_factors"]))
    return cls(groups, **kwargs)


def lr_at(step: int, total_steps: int, base_lr: float, sched: Mapping[str, Any]) -> float:
    """Learning rate at ``step``: linear warm-up, then cosine / step decay / constant."""
    warmup = int(sched["warmup_steps"])
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if sched["name"] == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        floor = base_lr * float(sched["min_lr_ratio"])
        return floor + 0.5 * (base_lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))
    if sched["name"] == "step":
        drops = sum(step >= int(m * total_steps) for m in sched["milestones"])
        return base_lr * float(sched["gamma"]) ** drops
    if sched["name"] == "constant":
        return base_lr
    raise ValueError(f"unknown scheduler.name {sched['name']!r}; use cosine, step or constant")


def start_training(s: FitSettings, job: Job, net: Net) -> Training:
    """``net`` with a fresh optimizer (:func:`build_optimizer` of ``s.optimizer``) and a grad
    scaler that is active only under float16 autocast."""
    optimizer = build_optimizer(s.optimizer, net.raw)
    scaler = torch.amp.GradScaler("cuda", enabled=job.amp_dtype == torch.float16)
    return Training(net, optimizer, scaler)


# ----------------------------------------------------------------------------- epochs
def _all_reduce(t: torch.Tensor, job: Job) -> torch.Tensor:
    if job.dist.is_distributed:
        dist.all_reduce(t)
    return t


def train_one_epoch(s: FitSettings, job: Job, data: Data, training: Training
                    ) -> dict[str, float]:
    """One pass over this rank's shard; updates ``training.state.step``. Returns the epoch's
    mean training loss (over all ranks), last learning rate and images per second. The host
    waits for the device only at the end (and every ``log_every`` steps while a progress bar
    shows)."""
    net, optimizer, scaler, state = (training.net, training.optimizer, training.scaler,
                                     training.state)
    total = s.epochs * data.steps_per_epoch
    base_lr = s.lr
    net.model.train()
    set_epoch(data.train, state.epoch)
    t0, loss_sum, lr = time.perf_counter(), torch.zeros((), device=job.device), base_lr
    bar = tqdm(data.train, desc=f"epoch {state.epoch + 1}/{s.epochs}", leave=False,
               disable=not (job.is_main and s.progress), dynamic_ncols=True)
    for x, y in bar:
        lr = lr_at(state.step, total, base_lr, s.scheduler)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = job.to_device(x), y.to(job.device, non_blocking=True)
        with job.autocast():
            loss = F.cross_entropy(net.model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if s.grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(net.raw.parameters(), s.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        state.step += 1
        loss_sum += loss.detach()
        if not bar.disable and state.step % s.log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}")
    loss_mean = _all_reduce(loss_sum / data.steps_per_epoch, job).item() / job.world
    seconds = time.perf_counter() - t0  # .item() above waited for the device
    images = data.steps_per_epoch * s.batch_size
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


def fit(s: FitSettings, job: Job, data: Data, training: Training,
        log: Callable[[dict[str, Any]], None]) -> bool:
    """Train from ``training.state.epoch`` to ``s.epochs``: evaluate every ``eval_every``
    epochs and after the last, record and ``log`` each epoch, checkpoint after each. Returns
    False when ``stop_after_epochs`` cut it short (as if killed), else True."""
    model, state = training.net.model, training.state
    eval_model = model.module if job.dist.is_distributed else model  # no DDP sync
    while state.epoch < s.epochs:
        record: dict[str, Any] = train_one_epoch(s, job, data, training)
        state.epoch += 1
        if state.epoch == s.epochs or state.epoch % s.eval_every == 0:
            ev = evaluate(eval_model, data.test, job, data.num_classes)
            record.update({f"test_{k}": v for k, v in ev.items()})
        record = {"epoch": state.epoch, **record}
        state.history.append(record)
        log(record)
        save_run(job, training, s.config)
        if s.stop_after_epochs and state.epoch >= s.stop_after_epochs:
            if job.is_main:
                print(f"stop_after_epochs={s.stop_after_epochs}: stopping (as if killed)")
            return False
    return True


# ----------------------------------------------------------------------------- W&B log
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
def open_log(s: WandbSettings, config: dict[str, Any], job: Job, state: TrainState
             ) -> Iterator[RunLog]:
    """A :class:`RunLog`; on rank 0 with ``s.mode`` not disabled, around a W&B run (``config``
    recorded) that resumes ``state.wandb_id`` (and records its id in ``state``). The run is
    finished on exit."""
    if not job.is_main or s.mode == "disabled":
        yield RunLog(job)
        return
    import wandb

    run = wandb.init(project=s.project, entity=s.entity, group=s.group, name=s.name,
                     tags=list(s.tags), mode=s.mode, dir=str(job.out_dir), config=config,
                     id=state.wandb_id, resume="allow")
    state.wandb_id = run.id
    try:
        yield RunLog(job, run)
    finally:
        run.finish()
