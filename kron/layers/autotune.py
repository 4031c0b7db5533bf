"""Pick the faster of several equivalent implementations by measuring them once.

Used by ``implementation="auto"`` on the Kronecker layers: at first use for a given layer
signature, input shape, device, dtype and grad mode, each candidate runs a few times
(alternating, after a warm-up, median, synchronised on CUDA) and the fastest is cached for the
rest of the process.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

from kron.timing import median_times

_CACHE: dict[Hashable, str] = {}


def clear_cache() -> None:
    """Forget every choice made so far (e.g. before re-benchmarking)."""
    _CACHE.clear()


def cached_choice(key: Hashable) -> str | None:
    """The choice made earlier for ``key``, if any."""
    return _CACHE.get(key)


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
        times = median_times(candidates, device, warmup=warmup, repeats=repeats)
        choice = min(times, key=times.__getitem__)
        _CACHE[key] = choice
    return choice
