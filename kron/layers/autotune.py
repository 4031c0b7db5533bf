"""Pick the faster of several equivalent implementations by measuring them once.

Used by ``implementation="auto"`` on the Kronecker layers: at first use for a given layer
signature, input shape, device, dtype and grad mode, each candidate runs a few times
(alternating, after a warm-up, median, synchronised on CUDA) and the fastest is cached for the
rest of the process.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable

import torch

_CACHE: dict[Hashable, str] = {}


def clear_cache() -> None:
    """Forget every choice made so far (e.g. before re-benchmarking)."""
    _CACHE.clear()


def cached_choice(key: Hashable) -> str | None:
    """The choice made earlier for ``key``, if any."""
    return _CACHE.get(key)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(
    candidates: dict[str, Callable[[], object]],
    device: torch.device,
    warmup: int = 2,
    repeats: int = 5,
) -> dict[str, float]:
    """Median seconds per call of each candidate, run alternately after ``warmup`` calls each."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def choose(
    key: Hashable,
    candidates: dict[str, Callable[[], object]],
    device: torch.device,
    warmup: int = 2,
    repeats: int = 5,
) -> str:
    """The fastest candidate's name for ``key``: measured on first call, cached afterwards."""
    choice = _CACHE.get(key)
    if choice is None:
        times = time_alternating(candidates, device, warmup=warmup, repeats=repeats)
        choice = min(times, key=times.__getitem__)
        _CACHE[key] = choice
    return choice
