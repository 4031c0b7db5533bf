"""Process set-up shared by kron's entrypoints (``kron.train``, ``kron.bench``, ``kron-tables``):
the allocator (once per process) and the process-wide state of one training job
(:func:`job_scope`: seeds, deterministic flags, threads, cuBLAS workspace; set and restored),
and the intra-op thread count every launcher agrees on (:func:`choose_threads`).

Threads: unless the user says (``threads=N``, or ``OMP_NUM_THREADS``), each process gets
``max(1, usable cores // processes of the job on this node)`` -- ``SLURM_CPUS_PER_TASK`` when
SLURM says it -- whether torchrun, submitit (local or SLURM) or nothing launched it, so a row's
numbers and its latency columns do not depend on the launcher, and two processes on two cores
do not each spin two OpenMP threads (the issue 17 measurement: 35 img/s instead of 430).

The allocator: glibc serves every block above its mmap threshold (128 KiB, adaptively raised up
to 32 MiB) with a fresh ``mmap`` and returns it to the kernel on ``free``. A layer that allocates
a 32 MB intermediate per call then pays the page faults of 8,192 fresh pages on every call
(about 9 ms here), and how often that happens depends on what the process did before (the
adaptive threshold moves). :func:`configure_allocator` makes it deterministic: large blocks come
from the heap and freed memory is kept for reuse, the same effect as starting Python with
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` raised. Where jemalloc or tcmalloc is
preloaded (``LD_PRELOAD``), glibc's settings do not apply and nothing is changed. See
docs/design.md, D6.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kron.distributed import NodeShare, node_share, set_cublas_workspace

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
# The largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2).
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap for reuse
_TOP_PAD = 64 * 1024 * 1024  # grow the heap in 64 MiB steps

_configured: str | None = None


def _preloaded_allocator() -> str | None:
    preload = os.environ.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if name in preload:
            return name
    return None


def configure_allocator() -> str:
    """Set up the process allocator once (idempotent) and say what was done, in one line.

    On glibc: ``mallopt`` raises the mmap threshold to its maximum (32 MiB) and the trim
    threshold to 1 GiB, so per-call intermediates are recycled from the heap instead of being
    mapped and unmapped on each call. Elsewhere (macOS, Windows, a preloaded jemalloc/tcmalloc)
    it changes nothing and says so. ``KRON_ALLOCATOR=system`` in the environment opts out.
    Called by kron's entrypoints (``kron.train``, ``kron.bench``); the layers never call it,
    though their CPU inference speed depends on it (docs/design.md, D6).
    """
    global _configured
    if _configured is not None:
        return _configured
    if os.environ.get("KRON_ALLOCATOR", "").lower() == "system":
        _configured = "allocator: left as it is (KRON_ALLOCATOR=system)"
        return _configured
    preloaded = _preloaded_allocator()
    if preloaded:
        _configured = f"allocator: {preloaded} (LD_PRELOAD), left as it is"
        return _configured
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _configured = "allocator: platform default (not glibc), left as it is"
        return _configured
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = all(
        libc.mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX),
            (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
            (_M_TOP_PAD, _TOP_PAD),
        )
    )
    _configured = (
        "allocator: glibc, mmap threshold 32 MiB, trim threshold 1 GiB (freed blocks reused)"
        if ok else "allocator: glibc rejected mallopt settings; left at its defaults"
    )
    return _configured


# ----------------------------------------------------------------------------- threads
def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask: taskset, cgroups, SLURM binding)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def in_launch_environment(name: str, pid: int | None = None) -> bool | None:
    """Whether ``name`` was in the environment process ``pid`` (default: the parent) started
    with, read from ``/proc/<pid>/environ`` (which later ``os.environ`` changes do not touch);
    None where that cannot be read (not Linux, no permission)."""
    path = Path(f"/proc/{os.getppid() if pid is None else pid}/environ")
    try:
        entries = path.read_bytes().split(b"\0")
    except OSError:
        return None
    return any(e.split(b"=", 1)[0] == name.encode() for e in entries)


def _omp_threads(share: NodeShare) -> int | None:
    """``OMP_NUM_THREADS`` as the user's choice, or None. torchrun sets it to 1 itself for its
    children when its own environment lacks it; that 1 is torchrun's, not the user's."""
    raw = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"OMP_NUM_THREADS={raw!r} is not a positive integer; unset it, or set "
                         "threads=N in the config")
    if (share.launcher == "torchrun" and raw == "1" and share.tasks_on_node > 1
            and not in_launch_environment("OMP_NUM_THREADS")):
        return None
    return int(raw)


def default_threads(share: NodeShare, cores: int) -> int:
    """``cores`` shared among this node's processes: ``SLURM_CPUS_PER_TASK`` (at most
    ``cores``) when SLURM gave it, else ``max(1, cores // share.tasks_on_node)``."""
    if share.cpus_per_task:
        return max(1, min(share.cpus_per_task, cores))
    return max(1, cores // share.tasks_on_node)


def choose_threads(threads: int | None = None) -> tuple[int, str]:
    """This process's intra-op threads and why, in one line: ``threads`` when given, else
    ``OMP_NUM_THREADS`` when the user set it, else :func:`default_threads`."""
    share = node_share()
    if threads:
        return int(threads), "set by threads=N"
    omp = _omp_threads(share)
    if omp is not None:
        return omp, "set by OMP_NUM_THREADS"
    cores = usable_cores()
    why = (f"SLURM_CPUS_PER_TASK={share.cpus_per_task}, {cores} usable cores"
           if share.cpus_per_task else
           f"{cores} usable cores / {share.tasks_on_node} process(es) on this node")
    return default_threads(share, cores), f"{why} ({share.launcher})"


def launch_record() -> dict[str, Any]:
    """What results.json records of how the run ran: this process's intra-op threads now and
    its launcher (``torchrun``, ``submitit_local``, ``submitit_slurm`` or ``single``)."""
    return {"threads": torch.get_num_threads(), "launcher": node_share().launcher}


# ----------------------------------------------------------------------------- one job's state
@dataclass
class JobSettings:
    """The process-wide knobs one training job sets (and :func:`job_scope` restores)."""

    seed: int = 0
    deterministic: bool = True
    cuda: bool = False
    threads: int | None = None  # None: :func:`choose_threads` decides


def _flags() -> dict[str, Any]:
    return {
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


def _set_flags(f: dict[str, Any]) -> None:
    torch.set_num_threads(f["threads"])
    torch.use_deterministic_algorithms(f["deterministic"], warn_only=f["warn_only"])
    torch.backends.cudnn.benchmark = f["cudnn_benchmark"]
    torch.backends.cudnn.deterministic = f["cudnn_deterministic"]
    torch.backends.cudnn.allow_tf32 = f["cudnn_tf32"]
    torch.backends.cuda.matmul.allow_tf32 = f["matmul_tf32"]


def _rng_states() -> tuple[Any, ...]:
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def _set_rng_states(states: tuple[Any, ...]) -> None:
    torch.set_rng_state(states[0])
    np.random.set_state(states[1])
    random.setstate(states[2])


@contextmanager
def job_scope(s: JobSettings) -> Iterator[list[str]]:
    """Set the process-wide state one job needs, and put back what was there on exit.

    Inside: the CPU RNGs (torch, numpy, random) seeded with ``s.seed``; deterministic
    algorithms and cuDNN settings as ``s`` says (TF32 matmuls on CUDA); ``threads``
    intra-op threads (``s.threads``, else :func:`choose_threads`'s; the choice is the first
    note); ``CUBLAS_WORKSPACE_CONFIG`` for deterministic cuBLAS. On exit every one of
    these, the RNG states included, is what it was before (the cuBLAS variable stays once CUDA
    is initialised: cuBLAS has read it), so two jobs of a multirun in one process behave like
    two processes. Yields the list of notes (one line each): the thread choice, and what
    could not be done, e.g. cuBLAS already initialised. See docs/design.md, D6.
    """
    before, rngs = _flags(), _rng_states()
    env_before = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    threads, why = choose_threads(s.threads)
    notes: list[str] = [f"threads: {threads} ({why})"]
    if s.deterministic and s.cuda and env_before is None:
        with warnings.catch_warnings():  # said once, as a note of the run, instead
            warnings.simplefilter("ignore", RuntimeWarning)
            in_effect = set_cublas_workspace()
        if not in_effect:
            notes.append("CUDA was initialised before the job set CUBLAS_WORKSPACE_CONFIG: "
                         "cuBLAS may not be deterministic (set it in the environment)")
    try:
        torch.manual_seed(s.seed)
        np.random.seed(s.seed % 2**32)
        random.seed(s.seed)
        _set_flags({
            "threads": threads,
            "deterministic": s.deterministic, "warn_only": True,
            "cudnn_benchmark": s.cuda and not s.deterministic,
            "cudnn_deterministic": s.deterministic,
            "cudnn_tf32": s.cuda,
            "matmul_tf32": s.cuda,
        })
        yield notes
    finally:
        _set_flags(before)
        _set_rng_states(rngs)
        if env_before is None and not torch.cuda.is_initialized():
            # once CUDA is up, cuBLAS handles made with the setting outlive the job anyway;
            # keeping the variable then keeps the next job honest about it
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
