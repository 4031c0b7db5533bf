"""Cost and speed of a model: parameters, MACs, latency, throughput, peak memory.

The one home of these numbers, used by training, surgery, the benchmark and the tables
(docs/design.md, D5):

- parameters are counted from the module's parameters (:func:`count_params`);
- MACs of what actually ran come from the real forward under
  ``torch.utils.flop_counter.FlopCounterMode`` (:func:`count_macs`; a matmul or convolution of
  ``k`` multiply-accumulates counts ``2k`` FLOPs; bias adds and elementwise ops are not counted).
  The closed forms of the dense layers (:func:`linear_macs`, :func:`conv2d_macs`, owned by
  :mod:`kron.layers.macs`) and the
  factored layers' own ``analytic_macs`` methods give the same numbers without running
  (:func:`layer_macs`, :func:`analytic_macs`); tests hold them equal to the counter;
- the factored MACs of a surgered net are the dense twin's minus what the surgery saved
  (:func:`surgered_macs`);
- speed is measured, never computed (:func:`measure_latency`, :func:`measure_speed`): the models
  run on the same input in one process, interleaved, after warm-up, and the median is kept
  (:mod:`kron.timing`);
- peak memory is the allocator's high-water mark during one call (:func:`peak_memory`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from kron.layers.macs import conv2d_macs, linear_macs
from kron.timing import median_times, synchronize, timer_name

# ------------------------------------------------------------------------------- parameters


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (``module.parameters()`` yields a shared parameter once, so it is
    counted once); ``trainable_only`` counts only those that require grad."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# ------------------------------------------------------------------------------------- MACs


def layer_macs(layer: nn.Module, input_shape: Sequence[int]) -> int | None:
    """Analytic MACs of one layer on an input of ``input_shape``; ``None`` if it has no cost
    formula (layers without matmul/conv, e.g. activations, cost 0 and return 0)."""
    if hasattr(layer, "analytic_macs"):
        return int(layer.analytic_macs(tuple(input_shape)))
    if isinstance(layer, nn.Linear):
        return linear_macs(input_shape, layer.in_features, layer.out_features)
    if isinstance(layer, nn.Conv2d):
        return conv2d_macs(input_shape, layer.weight.shape, layer.stride, layer.padding,
                           layer.dilation)
    if not any(True for _ in layer.children()):
        # a leaf without a weight matrix (activations, pooling, normalisation, dropout) runs no
        # matmul or convolution: FlopCounterMode counts nothing for it either
        if all(p.dim() < 2 for p in layer.parameters()):
            return 0
    return None


def layer_macs_known(layer: nn.Module) -> bool:
    """Whether :func:`layer_macs` has a closed formula for this layer type."""
    return hasattr(layer, "analytic_macs") or isinstance(layer, (nn.Linear, nn.Conv2d))


def _example_input(module: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    p = next(module.parameters(), None)
    kw = {"device": p.device, "dtype": p.dtype} if p is not None else {}
    return torch.randn(tuple(input_shape), **kw)


@torch.no_grad()
def count_macs(module: nn.Module, input_shape: Sequence[int] | torch.Tensor) -> int:
    """Multiply-accumulates of one forward on an input of ``input_shape`` (batch included), as
    executed: counted by ``FlopCounterMode`` on the real forward, in eval mode.

    Runs the forward once before counting, so that a layer that settles its execution plan on
    first use has done so (that run is not counted).
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


def surgered_macs(macs_dense: int, surgery_rows: Iterable[Mapping[str, Any]]) -> int:
    """MACs of a surgered net run factored: its dense twin's ``macs_dense`` minus what each
    swapped layer saved (rows with ``macs_before`` and ``macs_after``, as surgery writes them).

    What ran (:func:`count_macs`) can differ: a layer may execute composed (one dense op) when
    that is faster, which hides the reduction the factorisation makes possible.
    """
    return int(macs_dense) - sum(int(r["macs_before"]) - int(r["macs_after"])
                                 for r in surgery_rows)


# ----------------------------------------------------------------------------- peak memory


@dataclass(frozen=True)
class PeakMemory:
    """Bytes one call allocated: ``peak`` is the most it held at once beyond what was allocated
    before the call, ``output`` the size of the tensors it returned (part of ``peak``)."""

    peak: int
    output: int

    @property
    def workspace(self) -> int:
        """Peak bytes beyond the returned tensors: temporaries, buffers, scratch space."""
        return max(self.peak - self.output, 0)


def _output_bytes(out: object) -> int:
    tensors = [out] if isinstance(out, torch.Tensor) else [
        t for t in (out if isinstance(out, (tuple, list)) else ()) if isinstance(t, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _cpu_peak(fn: Callable[[], object]) -> tuple[int, object]:
    """Peak of the running sum of the CPU allocator's allocations and frees during ``fn``, as
    the PyTorch profiler records them (every allocation through c10's CPU allocator, op-internal
    scratch space included); deterministic, unlike the process's resident size. The profiler
    library's own log lines (start/stop, a failed GPU probe) are silenced unless the user set
    ``KINETO_LOG_LEVEL``."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.nbytes() != 0 and e.device_type() == torch.autograd.DeviceType.CPU]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()
        peak = max(peak, running)
    return peak, out


def _cuda_peak(fn: Callable[[], object], device: torch.device) -> tuple[int, object]:
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before, out


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> PeakMemory:
    """Peak bytes allocated during one call of ``fn`` beyond what was allocated before it.

    CUDA: the caching allocator's ``max_memory_allocated`` after resetting its peak. CPU: the
    high-water mark of the allocations the PyTorch profiler records (see :func:`_cpu_peak`).
    Run ``fn`` once beforehand if it allocates lasting state on first use (caches, plans).
    """
    device = torch.device(device)
    peak, out = _cuda_peak(fn, device) if device.type == "cuda" else _cpu_peak(fn)
    return PeakMemory(peak=int(peak), output=_output_bytes(out))


# ----------------------------------------------------------------------------------- speed


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def measure_latency(
    models: dict[str, nn.Module],
    example_input: torch.Tensor,
    warmup: int = 3,
    repeats: int = 10,
    dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Median inference latency in milliseconds of each model on ``example_input``.

    Models are put in eval mode (restored afterwards) and timed interleaved in this process
    (:mod:`kron.timing`), under ``torch.autocast`` to ``dtype`` when it is a lower precision.
    """
    device = example_input.device
    modes = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()

    def call(m: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with _autocast(device, dtype):
                return m(example_input)

        return run

    try:
        times = median_times({name: call(m) for name, m in models.items()}, device,
                             warmup=warmup, repeats=repeats)
    finally:
        for name, m in models.items():
            m.train(modes[name])
    return {name: t * 1e3 for name, t in times.items()}


def speedup(latency_ms: float, latency_dense_ms: float) -> float:
    """Measured speedup of a model over its dense twin (>1 means faster)."""
    return latency_dense_ms / latency_ms


def _batch(sample_shape: Sequence[int], batch: int, device: torch.device,
           channels_last: bool) -> torch.Tensor:
    x = torch.randn(batch, *sample_shape, device=device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def measure_speed(
    model: nn.Module,
    dense_twin: nn.Module,
    sample_shape: Sequence[int],
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    latency_batch: int = 64,
    throughput_batch: int | None = None,
    warmup: int = 5,
    repeats: int = 20,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Inference speed of ``model`` against its dense twin, as results.json records it.

    ``sample_shape`` is one input without the batch, e.g. ``(3, 32, 32)``. Latency: median
    milliseconds per forward at ``latency_batch``; throughput (when ``throughput_batch`` is
    given): samples per second at that larger batch, where a GPU is busy rather than waiting on
    launches. Both interleave the two models after warm-up, under autocast to ``dtype``, timed
    with CUDA events on CUDA (:mod:`kron.timing`).
    """
    device = torch.device(device)
    models = {"model": model, "dense": dense_twin}
    x = _batch(sample_shape, latency_batch, device, channels_last)
    lat = measure_latency(models, x, warmup=warmup, repeats=repeats, dtype=dtype)
    out: dict[str, Any] = {
        "latency_ms": lat["model"], "latency_dense_ms": lat["dense"],
        "speedup": speedup(lat["model"], lat["dense"]),
        "latency_batch_size": int(latency_batch), "latency_device": str(device),
        "latency_dtype": str(dtype).removeprefix("torch."), "latency_timer": timer_name(device),
        "latency_threads": torch.get_num_threads(),
        "throughput_batch_size": None, "throughput_img_s": None, "throughput_dense_img_s": None,
        "throughput_speedup": None,
    }
    if throughput_batch:
        del x
        xb = _batch(sample_shape, throughput_batch, device, channels_last)
        big = measure_latency(models, xb, warmup=warmup, repeats=repeats, dtype=dtype)
        out.update(
            throughput_batch_size=int(throughput_batch),
            throughput_img_s=throughput_batch / (big["model"] / 1e3),
            throughput_dense_img_s=throughput_batch / (big["dense"] / 1e3),
            throughput_speedup=speedup(big["model"], big["dense"]),
        )
    return out
