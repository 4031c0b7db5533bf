"""Opt-in measured choice of each Kronecker layer's implementation, made once before training.

``implementation="auto"`` follows a deterministic cost model by default
(:mod:`kron.layers.cost_model`). :func:`plan` instead times every candidate of every ``auto``
layer on the input that layer sees in one forward of ``example_input`` (:mod:`kron.timing`:
alternating, after warm-up, median), and :func:`apply_plan` pins the winners. Under
``torch.distributed`` only rank 0 measures and broadcasts its plan, so that every rank runs
the same code. The plan is a plain attribute of each layer (``planned_implementation``), never
part of the state dict: a checkpoint carries weights, not one machine's timings
(docs/design.md, D4).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kron.layers.kron_base import KroneckerSum, implementation_name
from kron.timing import median_times, training_step


def auto_layers(model: nn.Module) -> dict[str, KroneckerSum]:
    """The Kronecker layers of ``model`` whose implementation is ``"auto"``, by name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, KroneckerSum) and m.implementation == "auto"}


def _layer_inputs(model: nn.Module, layers: dict[str, KroneckerSum],
                  example_input: torch.Tensor | tuple) -> dict[str, torch.Tensor]:
    """The input each layer receives in one forward of ``example_input`` (no grad)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(
        lambda _m, args, name=name: seen.setdefault(name, args[0].detach()))
        for name, m in layers.items()]
    try:
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        with torch.no_grad():
            model(*args)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _candidates(layer: KroneckerSum, device_type: str) -> list[str]:
    return list(layer.candidates(device_type))


def _runner(layer: KroneckerSum, x: torch.Tensor, impl: str,
            training: bool) -> Callable[[], object]:
    if not training:
        def infer() -> object:
            with torch.no_grad():
                return layer.run_implementation(x, impl)
        return infer
    xg = x.clone().requires_grad_(x.is_floating_point())
    inputs = [t for t in (xg, *layer.parameters()) if t.requires_grad]
    return training_step(lambda: layer.run_implementation(xg, impl), inputs)


def measure_plan(model: nn.Module, example_input: torch.Tensor | tuple, training: bool,
                 warmup: int = 2, repeats: int = 5) -> dict[str, str]:
    """Time every candidate of every ``auto`` layer here (no collective)."""
    layers = auto_layers(model)
    inputs = _layer_inputs(model, layers, example_input)
    plan_: dict[str, str] = {}
    for name, layer in layers.items():
        if name not in inputs:  # not reached by this input
            continue
        x = inputs[name]
        runs = {impl: _runner(layer, x, impl, training)
                for impl in _candidates(layer, x.device.type)}
        times = median_times(runs, x.device, warmup=warmup, repeats=repeats)
        plan_[name] = min(times, key=times.__getitem__)
    return plan_


def plan(model: nn.Module, example_input: torch.Tensor | tuple, training: bool | None = None,
         warmup: int = 2, repeats: int = 5) -> dict[str, str]:
    """``{layer name: implementation}`` for every ``auto`` Kronecker layer of ``model``,
    measured once on the input each layer sees in a forward of ``example_input``.

    ``training`` (default: ``model.training``) times forward+backward instead of inference.
    With ``torch.distributed`` initialised, rank 0 measures and broadcasts the plan to every
    rank (``broadcast_object_list``; on NCCL the current CUDA device must be set). Apply it
    with :func:`apply_plan`.
    """
    training = model.training if training is None else training
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    result: dict[str, str] | None = None
    if not distributed or torch.distributed.get_rank() == 0:
        result = measure_plan(model, example_input, training, warmup, repeats)
    if distributed:
        box = [result]
        torch.distributed.broadcast_object_list(box, src=0)
        result = box[0]
    return dict(result)


def apply_plan(model: nn.Module, plan_: dict[str, str]) -> None:
    """Pin each named layer's ``"auto"`` to the planned implementation (a plain attribute,
    not saved in the state dict). Unknown names or implementations are a ``ValueError``."""
    layers = auto_layers(model)
    for name, impl in plan_.items():
        impl = implementation_name(impl)  # a plan saved under an old name
        layer = layers.get(name)
        if layer is None:
            raise ValueError(
                f"plan names layer {name!r}, which is not an 'auto' Kronecker layer of the model "
                f"(those are: {', '.join(layers) or 'none'})")
        if impl not in layer.implementations or impl == "auto":
            raise ValueError(f"plan gives layer {name!r} implementation {impl!r}; expected one "
                             f"of {', '.join(i for i in layer.implementations if i != 'auto')}")
        layer.planned_implementation = impl


def clear_plan(model: nn.Module) -> None:
    """Forget any applied plan: every ``auto`` layer follows the cost model again."""
    for layer in auto_layers(model).values():
        layer.planned_implementation = None
