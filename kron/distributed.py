"""How this process was launched, and the process group that follows from it.

One place reads the launcher's environment, so training code never looks at ``RANK`` or
SLURM variables itself. Three launches are recognised, in this order:

1. **torchrun** (``python -m torch.distributed.run --nproc_per_node N -m kron.train ...``):
   ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` are set by torchrun;
   the process group is initialised with ``env://`` (torchrun's own rendezvous).
2. **submitit** (``hydra/launcher=submitit_slurm`` or ``submitit_local`` with
   ``hydra.launcher.tasks_per_node=N``, and ``nodes``): every task runs the Hydra job function.
   ``submitit.JobEnvironment()`` gives rank (``global_rank``), ``local_rank`` and the world size
   (``num_tasks``); the master is the first host of the job (``hostnames[0]``) and the port is
   derived from the job id (:func:`port_for_job`), so every task of one job computes the same
   address and two jobs on one node almost never collide. ``MASTER_ADDR`` / ``MASTER_PORT`` in
   the environment override both. The group is initialised with ``tcp://addr:port``.
3. Otherwise a **single process**: no process group.

API (what ``kron/train.py`` calls; see docs/design.md, D7 and D9):

- ``ctx = init_distributed(device_type)`` -- ``device_type`` is ``"cpu"``, ``"cuda"`` or
  ``"auto"``. On CUDA it calls ``torch.cuda.set_device`` BEFORE ``init_process_group`` and
  before any collective. Backend: NCCL for CUDA, gloo for CPU. Returns a :class:`DistContext`.
  Calling it again while a group is up returns the same context (the group is reused).
- ``DistContext`` fields: ``rank``, ``world_size``, ``local_rank``, ``master_addr`` (None when
  single), ``master_port`` (None when single), ``backend`` (``"nccl"``, ``"gloo"`` or None when
  single), ``device`` (``torch.device``), ``launcher`` (``"torchrun"``, ``"submitit"`` or
  ``"single"``); properties ``is_distributed`` (world_size > 1) and ``is_main`` (rank 0).
- ``detect_launch() -> LaunchEnv`` -- the parsing alone, without side effects (for tests, logs).
- ``broadcast_object(obj, src=0)`` -- ``src``'s object on every rank (``obj`` when single).
- ``all_gather_objects(obj) -> list`` -- every rank's object, in rank order (``[obj]`` single).
- ``is_main() -> bool`` -- rank 0, or no process group.
- ``barrier()`` -- waits for all ranks (no-op when single).
- ``cleanup()`` -- destroys the process group if one is up (call it in a ``finally``), so the
  next job of a multirun in the same process starts clean.
- ``node_share() -> NodeShare`` -- the launcher's name (``torchrun``, ``submitit_local``,
  ``submitit_slurm``, ``single``), how many of the job's processes run on this node, and the
  CPUs SLURM gave each task (``SLURM_CPUS_PER_TASK``); what :mod:`kron.runtime` divides the
  node's cores by to choose each process's threads.
- ``seed_for_rank(base_seed, rank) -> int`` -- the seed of a rank's random streams (data
  augmentation, loader workers): ``base_seed`` on rank 0, distinct on every other rank.
- ``set_cublas_workspace() -> bool`` -- sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (needed for
  deterministic cuBLAS) if CUDA is not initialised yet; if it already is, and the variable is
  unset, warns in one line and returns False. Call it before anything touches CUDA.
"""

from __future__ import annotations

import os
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

#: ports derived from a submitit job id fall in [PORT_BASE, PORT_BASE + PORT_SPAN)
PORT_BASE, PORT_SPAN = 20_000, 40_000
#: the cuBLAS workspace setting that makes cuBLAS deterministic (see the CUDA docs)
CUBLAS_WORKSPACE = ":4096:8"


class LaunchEnv(NamedTuple):
    """What the launcher told this process (parsed from the environment, nothing initialised)."""

    launcher: str  # "torchrun" | "submitit" | "single"
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: who it is, whom it talks to, which device it uses."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    launcher: str = "single"

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ----------------------------------------------------------------------------- parsing
def _int_env(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise ValueError(f"environment variable {name} is not set; launch with torchrun, "
                             "which sets RANK, WORLD_SIZE and LOCAL_RANK together")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def port_for_job(job_id: str) -> int:
    """The rendezvous port of a submitit job: a CRC32 of its id folded into the port range.

    Every task of the job computes the same port without talking to the others; array tasks
    (``123_0``, ``123_1``: the rows of one table) get different ones.
    """
    return PORT_BASE + zlib.crc32(str(job_id).encode()) % PORT_SPAN


def _check(launcher: str, rank: int, world: int, local_rank: int) -> None:
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise ValueError(f"{launcher}: rank={rank}, world_size={world}, local_rank={local_rank} "
                         "is not a valid launch (need 0 <= rank < world_size)")


def _submitit_env() -> Any | None:
    """submitit's job environment when this process is a submitit task, else None."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    try:
        import submitit

        return submitit.JobEnvironment()
    except (ImportError, RuntimeError):  # no submitit, or an executor it does not know
        return None


def detect_launch() -> LaunchEnv:
    """Parse the launcher's environment (torchrun first, then submitit, else single process).

    Pure: reads ``os.environ`` (and submitit's job environment), initialises nothing.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = _int_env("RANK"), _int_env("WORLD_SIZE")
        local_rank = _int_env("LOCAL_RANK", 0)
        _check("torchrun", rank, world, local_rank)
        port = os.environ.get("MASTER_PORT")
        return LaunchEnv("torchrun", rank, world, local_rank, os.environ.get("MASTER_ADDR"),
                         int(port) if port else None)
    job = _submitit_env()
    if job is not None:
        rank, world, local_rank = int(job.global_rank), int(job.num_tasks), int(job.local_rank)
        _check("submitit", rank, world, local_rank)
        if world == 1:
            return LaunchEnv("submitit", 0, 1, 0, None, None)
        addr = os.environ.get("MASTER_ADDR") or job.hostnames[0]
        port = _int_env("MASTER_PORT", port_for_job(job.job_id))
        return LaunchEnv("submitit", rank, world, local_rank, addr, port)
    return LaunchEnv("single", 0, 1, 0, None, None)


class NodeShare(NamedTuple):
    """How this process shares its node with the rest of its job."""

    launcher: str  # "torchrun" | "submitit_local" | "submitit_slurm" | "single"
    tasks_on_node: int  # processes of this job on this node (>= 1)
    cpus_per_task: int | None  # CPUs SLURM gave this task (SLURM_CPUS_PER_TASK), None: not said


def _slurm_cpus() -> int | None:
    raw = os.environ.get("SLURM_CPUS_PER_TASK")
    return _int_env("SLURM_CPUS_PER_TASK") if raw else None


def node_share() -> NodeShare:
    """Who launched this process and how many of the job's processes share its node.

    torchrun: ``LOCAL_WORLD_SIZE`` (else the world size); its children share the CPUs of the
    one task that ran torchrun, so ``SLURM_CPUS_PER_TASK`` is not theirs. submitit: tasks per
    node from ``SLURM_NTASKS_PER_NODE`` (SLURM) or the job's tasks over its nodes, plus
    ``SLURM_CPUS_PER_TASK`` when set. Otherwise one process (with ``SLURM_CPUS_PER_TASK`` when
    run by ``srun``). Reads the environment only.
    """
    launch = detect_launch()
    if launch.launcher == "torchrun":
        return NodeShare("torchrun", max(1, _int_env("LOCAL_WORLD_SIZE", launch.world_size)),
                         None)
    job = _submitit_env()
    if launch.launcher == "submitit" and job is not None:
        executor = os.environ.get("SUBMITIT_EXECUTOR", "local")
        tasks = -(-int(job.num_tasks) // max(1, int(job.num_nodes)))
        if executor == "slurm" and os.environ.get("SLURM_NTASKS_PER_NODE"):
            tasks = _int_env("SLURM_NTASKS_PER_NODE")
        return NodeShare(f"submitit_{executor}", max(1, tasks), _slurm_cpus())
    return NodeShare("single", 1, _slurm_cpus())


# ----------------------------------------------------------------------------- set-up
def _resolve_device_type(device_type: str) -> str:
    if device_type == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device={device_type!r} is not supported; use cpu, cuda or auto")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is available; use device=cpu")
    return device_type


def _cuda_index(local_rank: int) -> int:
    """The GPU of this task: ``local_rank`` when every task sees all the node's GPUs; 0 when the
    launcher bound one GPU to each task (SLURM ``gpus_per_task``)."""
    count = torch.cuda.device_count()
    if local_rank < count:
        return local_rank
    if count == 1:
        return 0
    raise ValueError(f"local rank {local_rank} but only {count} GPUs are visible; ask for as many "
                     "GPUs per node as tasks per node (hydra.launcher.gpus_per_node)")


def _context_from_group(launch: LaunchEnv, device: torch.device) -> DistContext:
    rank, world = dist.get_rank(), dist.get_world_size()
    if (rank, world) != (launch.rank, launch.world_size):
        raise RuntimeError(f"a process group (rank {rank} of {world}) is already up, but the "
                           f"launcher says rank {launch.rank} of {launch.world_size}; call "
                           "kron.distributed.cleanup() at the end of each job")
    return DistContext(rank, world, launch.local_rank, launch.master_addr, launch.master_port,
                       dist.get_backend(), device, launch.launcher)


def init_distributed(device_type: str) -> DistContext:
    """Join the job's process group (if it has more than one process) and pick this device.

    ``device_type``: ``"cpu"``, ``"cuda"`` or ``"auto"``. On CUDA, ``torch.cuda.set_device`` runs
    before ``init_process_group`` so NCCL and every later collective use this task's GPU.
    """
    kind = _resolve_device_type(device_type)
    launch = detect_launch()
    device = torch.device("cpu")
    if kind == "cuda":
        device = torch.device("cuda", _cuda_index(launch.local_rank))
        torch.cuda.set_device(device)
    if launch.world_size == 1:
        return DistContext(device=device, launcher=launch.launcher)
    if dist.is_initialized():
        return _context_from_group(launch, device)
    backend = "nccl" if kind == "cuda" else "gloo"
    if launch.launcher == "torchrun":
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, init_method=f"tcp://{launch.master_addr}:"
                                f"{launch.master_port}", rank=launch.rank,
                                world_size=launch.world_size)
    return DistContext(launch.rank, launch.world_size, launch.local_rank, launch.master_addr,
                       launch.master_port, backend, device, launch.launcher)


# ----------------------------------------------------------------------------- collectives
def _up() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    """True on rank 0, and in a single process."""
    return not _up() or dist.get_rank() == 0


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects; ``obj`` itself when single)."""
    if not _up():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` when single)."""
    if not _up():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait until every rank gets here (no-op when single)."""
    if not _up():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group if one is up, so nothing outlives the job."""
    if _up():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- per-process
def seed_for_rank(base_seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own random streams: ``base_seed`` on rank 0 (a single process
    reproduces itself), and a different seed on every other rank, so ranks do not draw the same
    augmentations. Model initialisation uses ``base_seed`` on every rank (DDP also broadcasts it).
    """
    if rank < 0:
        raise ValueError(f"rank={rank} must be >= 0")
    return (int(base_seed) + 1_000_003 * int(rank)) % 2**63


def set_cublas_workspace() -> bool:
    """Set ``CUBLAS_WORKSPACE_CONFIG`` for deterministic cuBLAS, if that can still take effect.

    cuBLAS reads the variable when CUDA initialises, so it is set only while CUDA is not yet
    initialised (an existing value is kept). Returns True when the variable is in effect; if CUDA
    is already up without it, warns in one line and returns False.
    """
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
        return True
    if torch.cuda.is_initialized():
        warnings.warn("CUBLAS_WORKSPACE_CONFIG not set before CUDA initialised: cuBLAS may not "
                      "be deterministic; set it in the environment or call "
                      "kron.distributed.set_cublas_workspace() first", RuntimeWarning,
                      stacklevel=2)
        return False
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    return True
