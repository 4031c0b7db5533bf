"""The one timer of kron: callables run alternately after warm-up, synchronised on CUDA.

Alternating the candidates makes drifts in clock speed or load hit all of them alike; the caller
takes the median of the samples. Used by :mod:`kron.measure` (speedup), the benchmark and
``implementation="auto"``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels on a CUDA device (no-op elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callables(
    fns: dict[str, Callable[[], object]],
    device: torch.device | str = "cpu",
    warmup: int = 3,
    repeats: int = 10,
) -> dict[str, list[float]]:
    """Per-call seconds of each callable: ``warmup`` calls each, then ``repeats`` rounds in
    which every callable runs once, in turn. Returns every sample."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return samples


def median_times(
    fns: dict[str, Callable[[], object]],
    device: torch.device | str = "cpu",
    warmup: int = 3,
    repeats: int = 10,
) -> dict[str, float]:
    """Median seconds per call of each callable (see :func:`time_callables`)."""
    samples = time_callables(fns, device, warmup=warmup, repeats=repeats)
    return {name: statistics.median(s) for name, s in samples.items()}
