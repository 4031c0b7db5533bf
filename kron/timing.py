"""The one timer of kron: callables timed in interleaved rounds after warm-up.

Every candidate runs once per round and the order rotates from round to round (A B C, B C A,
C A B, ...), so drifts in clock speed or load, and any advantage of running first or right
after another candidate, hit all candidates alike; callers take the median of the samples.

How one call is timed depends on the device (docs/design.md, D5):

- CPU: ``time.perf_counter`` around the call.
- CUDA: a pair of CUDA events recorded around the call, on a queue that was drained before it
  (so the launch cost of the call is part of its time, as it is for a real inference call);
  the events are read after the round's final synchronisation. Host timers around
  asynchronous launches measure the launch queue, not the GPU.

Used by :mod:`kron.measure` and :mod:`kron.bench`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from time import perf_counter

import torch

Reading = Callable[[], float]  # seconds of one timed call, read once the round has synchronised


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels on a CUDA device (no-op elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_on_host(fn: Callable[[], object], number: int) -> Reading:
    start = perf_counter()
    for _ in range(number):
        fn()
    elapsed = (perf_counter() - start) / number
    return lambda: elapsed


def _time_with_cuda_events(device: torch.device) -> Callable[[Callable[[], object], int], Reading]:
    def timed(fn: Callable[[], object], number: int) -> Reading:
        torch.cuda.synchronize(device)  # an empty queue: the call pays its own launches
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        return lambda: start.elapsed_time(end) / 1e3 / number  # elapsed_time is in ms

    return timed


def timer_name(device: torch.device | str) -> str:
    """What :func:`time_callables` times with on ``device`` (recorded beside measurements)."""
    return "cuda_events" if torch.device(device).type == "cuda" else "perf_counter"


def round_order(names: list[str], round_index: int) -> list[str]:
    """The order of the candidates in round ``round_index``: rotated by one each round."""
    k = round_index % len(names)
    return names[k:] + names[:k]


def time_callables(
    fns: dict[str, Callable[[], object]],
    device: torch.device | str = "cpu",
    warmup: int = 3,
    repeats: int = 10,
    number: int = 1,
) -> dict[str, list[float]]:
    """Seconds per call of each callable, every sample: ``warmup`` untimed calls of each, then
    ``repeats`` rounds in which every callable runs, in :func:`round_order`. A sample is the
    mean of ``number`` back-to-back calls (more than 1 for calls so short that one launch or
    one timer read would dominate)."""
    if not fns:
        raise ValueError("time_callables needs at least one callable")
    if repeats < 1 or warmup < 0 or number < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0 and number >= 1, got repeats={repeats}, "
                         f"warmup={warmup}, number={number}")
    device = torch.device(device)
    timed = _time_with_cuda_events(device) if device.type == "cuda" else _time_on_host
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        readings = [(name, timed(fns[name], number)) for name in round_order(names, r)]
        synchronize(device)
        for name, read in readings:
            samples[name].append(read())
    return samples


def median_times(
    fns: dict[str, Callable[[], object]],
    device: torch.device | str = "cpu",
    warmup: int = 3,
    repeats: int = 10,
    number: int = 1,
) -> dict[str, float]:
    """Median seconds per call of each callable (see :func:`time_callables`)."""
    samples = time_callables(fns, device, warmup=warmup, repeats=repeats, number=number)
    return {name: statistics.median(s) for name, s in samples.items()}


def training_step(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor]
                  ) -> Callable[[], object]:
    """A callable that times one training step of ``fn``: its forward, then the gradients of
    ``inputs`` (the input and the parameters that require grad) for an all-ones upstream
    gradient. Used wherever forward+backward is timed (bench, layer plans, GPU benchmark)."""
    def step() -> object:
        out = fn()
        return torch.autograd.grad(out, inputs, torch.ones_like(out))

    return step
