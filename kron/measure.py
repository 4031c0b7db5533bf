"""Cost and speed of a model: parameters, MACs, latency, speedup.

One method, used by training, the benchmark and the tables (DESIGN.md sections 3 and 6):

- parameters are counted from the module's parameters;
- MACs come from running the real forward under ``torch.utils.flop_counter.FlopCounterMode``
  (it sees what actually executes; a matmul or convolution of ``k`` multiply-accumulates counts
  ``2k`` FLOPs, bias adds and elementwise ops are not counted), and :func:`analytic_macs` sums the
  per-layer formulas that tests hold equal to it;
- latency is measured, never computed: models timed on the same input in one process,
  alternating, after warm-up, median of repeats, synchronised on CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kron.layers.common import conv_output_size
from kron.timing import median_times


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared parameters counted once)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def _example_input(module: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    p = next(module.parameters(), None)
    kw = {"device": p.device, "dtype": p.dtype} if p is not None else {}
    return torch.randn(tuple(input_shape), **kw)


@torch.no_grad()
def count_macs(module: nn.Module, input_shape: Sequence[int] | torch.Tensor) -> int:
    """Multiply-accumulates of one forward on an input of ``input_shape`` (batch included).

    Runs the forward once before counting so that ``implementation="auto"`` layers have made
    their choice (their timing runs are not counted), then once under ``FlopCounterMode``.
    """
    x = input_shape if isinstance(input_shape, torch.Tensor) else _example_input(
        module, input_shape)
    was_training = module.training
    module.eval()
    try:
        module(x)
        with FlopCounterMode(display=False) as counter:
            module(x)
    finally:
        module.train(was_training)
    return counter.get_total_flops() // 2


def layer_macs(layer: nn.Module, input_shape: Sequence[int]) -> int | None:
    """Analytic MACs of one layer on an input of ``input_shape``; ``None`` if it has no cost
    formula (layers without matmul/conv, e.g. activations, cost 0 and return 0)."""
    if hasattr(layer, "analytic_macs"):
        return int(layer.analytic_macs(tuple(input_shape)))
    if isinstance(layer, nn.Linear):
        rows = 1
        for s in input_shape[:-1]:
            rows *= int(s)
        return rows * layer.in_features * layer.out_features
    if isinstance(layer, nn.Conv2d):
        if isinstance(layer.padding, str):
            return None
        ho, wo = conv_output_size(tuple(input_shape[2:]), layer.kernel_size, layer.stride,
                                  layer.padding, layer.dilation)
        per_out = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
        return int(input_shape[0]) * layer.out_channels * per_out * ho * wo
    if not any(True for _ in layer.children()):
        # a leaf without a weight matrix (activations, pooling, normalisation, dropout) runs no
        # matmul or convolution: FlopCounterMode counts nothing for it either
        if all(p.dim() < 2 for p in layer.parameters()):
            return 0
    return None


@torch.no_grad()
def analytic_macs(module: nn.Module, input_shape: Sequence[int]) -> int:
    """Sum of the per-layer MAC formulas over the leaf layers that a forward visits.

    Input shapes are captured with forward hooks; a layer with a formula (``analytic_macs``
    method, ``nn.Linear``, ``nn.Conv2d``) is counted whole and its children are not visited.
    Leaves without a weight matrix (activations, pooling, normalisation) count 0. Raises
    ``ValueError`` for a leaf with a weight matrix and no formula.
    """
    shapes: list[tuple[nn.Module, tuple[int, ...]]] = []
    handles = []

    def hook(mod: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            shapes.append((mod, tuple(args[0].shape)))

    formula_roots = [m for m in module.modules() if layer_macs_known(m)]
    inside = {id(c) for m in formula_roots for c in m.modules() if c is not m}
    for m in module.modules():
        if id(m) in inside:
            continue
        if layer_macs_known(m) or not any(True for _ in m.children()):
            handles.append(m.register_forward_pre_hook(hook))
    was_training = module.training
    module.eval()
    try:
        module(_example_input(module, input_shape))
    finally:
        module.train(was_training)
        for h in handles:
            h.remove()
    total = 0
    for mod, shape in shapes:
        macs = layer_macs(mod, shape)
        if macs is None:
            raise ValueError(f"no MAC formula for {type(mod).__name__}; count it with count_macs")
        total += macs
    return total


def layer_macs_known(layer: nn.Module) -> bool:
    """Whether :func:`layer_macs` has a closed formula for this layer type."""
    return hasattr(layer, "analytic_macs") or isinstance(layer, (nn.Linear, nn.Conv2d))


@torch.no_grad()
def measure_latency(
    models: dict[str, nn.Module],
    example_input: torch.Tensor,
    warmup: int = 3,
    repeats: int = 10,
) -> dict[str, float]:
    """Median inference latency in milliseconds of each model on ``example_input``.

    Models are put in eval mode and timed alternately in this process (DESIGN.md section 6), so
    that drifts in clock speed or load hit all of them alike.
    """
    modes = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        times = median_times(
            {name: (lambda m=m: m(example_input)) for name, m in models.items()},
            example_input.device, warmup=warmup, repeats=repeats,
        )
    finally:
        for name, m in models.items():
            m.train(modes[name])
    return {name: t * 1e3 for name, t in times.items()}


def speedup(latency_ms: float, latency_dense_ms: float) -> float:
    """Measured speedup of a model over its dense twin (>1 means faster)."""
    return latency_dense_ms / latency_ms
