"""The optimizer and the learning-rate schedule.

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
from collections.abc import Mapping
from typing import Any

import hydra
import torch
from torch import nn

from kron.config_schema import OPTIMIZER_META
from kron.layers import KronConv2d, KronLinear

NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


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
    groups = param_groups(model, weight_decay, bool(opt_cfg.get("decay_kron_factors", True)))
    return cls(groups, **kwargs)


def lr_at(step: int, total_steps: int, base_lr: float, sched: Mapping[str, Any]) -> float:
    """Learning rate at ``step``: linear warm-up, then cosine / step decay / constant."""
    warmup = int(sched.get("warmup_steps", 0))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if sched["name"] == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        floor = base_lr * float(sched.get("min_lr_ratio", 0.0))
        return floor + 0.5 * (base_lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))
    if sched["name"] == "step":
        drops = sum(step >= int(m * total_steps) for m in sched["milestones"])
        return base_lr * float(sched["gamma"]) ** drops
    if sched["name"] == "constant":
        return base_lr
    raise ValueError(f"unknown scheduler.name {sched['name']!r}; use cosine, step or constant")
