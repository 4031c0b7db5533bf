"""Step 3 of the recipe: the baseline net, layer surgery, the optional layer plan, placement."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kron import distributed
from kron.errors import ConfigError, KronError, one_line
from kron.layers.errors import FactorizationError
from kron.models import build_model_from_config
from kron.models.surgery import SurgeryRow, apply_surgery, format_table
from kron.recipe.checkpoint import CKPT_NAME, load_checkpoint
from kron.recipe.setup import Job


@dataclass
class Net:
    """The model as training calls it (``model``: maybe compiled, maybe DDP) and as it is saved
    and measured (``raw``), what surgery changed, and how to build the dense twin."""

    model: nn.Module
    raw: nn.Module
    rows: list[SurgeryRow]
    build_dense: Callable[[], nn.Module]
    plan: dict[str, Any] = field(default_factory=dict)


def layers_spec(cfg: DictConfig) -> dict[str, dict]:
    """The surgery spec of ``cfg.layers``, with ``cfg.implementation`` (if set) on every
    Kronecker entry."""
    spec = OmegaConf.to_container(cfg.layers, resolve=True) if cfg.layers else {}
    if cfg.implementation:
        for entry in spec.values():
            if entry.get("kind") == "kron":
                entry["implementation"] = cfg.implementation
    return spec


def surgered_model(cfg: DictConfig, num_classes: int, shape: tuple[int, int, int]
                   ) -> tuple[nn.Module, list[SurgeryRow], Callable[[], nn.Module]]:
    """The dense baseline (with ``init_from``'s weights, if given) with ``cfg.layers`` swapped
    in; the surgery rows; and a builder of the dense twin (same seed-free architecture)."""
    def build_dense() -> nn.Module:
        return build_model_from_config(cfg.model, num_classes, shape[0], shape[1])

    model = build_dense()
    if cfg.init_from:  # a trained dense run to fit `init: dense` layers from
        src = Path(hydra.utils.to_absolute_path(str(cfg.init_from)))
        model.load_state_dict(load_checkpoint(src / CKPT_NAME if src.is_dir() else src)["model"])
    # layers_strict: refuse the run when a matched layer cannot meet its entry, instead of
    # leaving it dense and reporting it in the surgery table
    rows = apply_surgery(model, layers_spec(cfg), (1, *shape), strict=bool(cfg.layers_strict))
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


def place_model(cfg: DictConfig, job: Job, raw: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``raw`` on the job's device (channels_last if asked), SyncBatchNorm under multi-GPU DDP,
    compiled if asked, DDP-wrapped when there are several processes. Returns (model, raw)."""
    raw.to(job.device)
    if job.channels_last:
        raw.to(memory_format=torch.channels_last)
    if job.dist.is_distributed and job.cuda and cfg.sync_bn:
        raw = nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    model = torch.compile(raw) if cfg.compile else raw
    if job.dist.is_distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[job.device.index] if job.cuda else None)
    return model, raw


def build_net(cfg: DictConfig, job: Job, num_classes: int, shape: tuple[int, int, int]) -> Net:
    """Build, surger, (optionally) plan and place the model. Every rank builds it from the same
    seed; afterwards each rank's torch RNG moves to its own seed (dropout differs per rank).
    A model or ``layers=`` spec that cannot be built is one :class:`ConfigError`."""
    try:
        raw, rows, build_dense = surgered_model(cfg, num_classes, shape)
    except (KronError, FactorizationError):
        raise
    except ValueError as err:  # surgery and the model builders refuse a spec with ValueError
        raise ConfigError(one_line(err)) from err
    if job.is_main:
        print(format_table(rows) if rows else "(no layers swapped: dense baseline)")
    model, raw = place_model(cfg, job, raw)
    plan = plan_layers(raw, job, shape, cfg.batch_size // job.world) if cfg.plan_layers else {}
    torch.manual_seed(distributed.seed_for_rank(int(cfg.seed), job.rank))
    return Net(model, raw, rows, build_dense, plan)
