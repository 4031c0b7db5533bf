"""kron.runtime's thread choice: every launcher gives a process max(1, usable cores // processes
on its node) intra-op threads unless the user said (threads=N, OMP_NUM_THREADS), and
results.json's launch record says which launcher and how many threads; the allocator opt-out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kron import distributed as kd
from kron import runtime
from kron.distributed import NodeShare

ROOT = Path(__file__).resolve().parents[1]
VARS = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
        "SUBMITIT_EXECUTOR", "SLURM_CPUS_PER_TASK", "SLURM_NTASKS_PER_NODE", "SLURM_JOB_ID",
        "SLURM_NTASKS", "SLURM_JOB_NUM_NODES", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID",
        "SLURM_JOB_NODELIST", "OMP_NUM_THREADS"]


@pytest.fixture
def env(monkeypatch):
    """No launcher or thread variables, whatever the shell running pytest has set."""
    for name in VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _set(mp, **values):
    for k, v in values.items():
        mp.setenv(k, str(v))


def _torchrun(mp, local_world=2):
    _set(mp, RANK=1, WORLD_SIZE=4, LOCAL_RANK=1, LOCAL_WORLD_SIZE=local_world,
         MASTER_ADDR="127.0.0.1", MASTER_PORT=29500)


def _slurm(mp, **extra):
    _set(mp, SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID=77, SLURM_NTASKS=6, SLURM_JOB_NUM_NODES=2,
         SLURM_PROCID=4, SLURM_LOCALID=1, SLURM_NODEID=1, SLURM_JOB_NODELIST="n[1-2]", **extra)


# ----------------------------------------------------------------------------- node share
def test_single_process_has_the_node_to_itself(env):
    assert kd.node_share() == NodeShare("single", 1, None)
    env.setenv("SLURM_CPUS_PER_TASK", "6")  # srun python -m kron.train
    assert kd.node_share() == NodeShare("single", 1, 6)


def test_torchrun_shares_by_local_world_size_and_ignores_slurm_cpus(env):
    _torchrun(env, local_world=2)
    env.setenv("SLURM_CPUS_PER_TASK", "16")  # the CPUs of the one task that ran torchrun
    assert kd.node_share() == NodeShare("torchrun", 2, None)


def test_submitit_slurm_reads_tasks_per_node_and_cpus_per_task(env):
    _slurm(env)
    assert kd.node_share() == NodeShare("submitit_slurm", 3, None)  # 6 tasks over 2 nodes
    env.setenv("SLURM_NTASKS_PER_NODE", "4")
    env.setenv("SLURM_CPUS_PER_TASK", "5")
    assert kd.node_share() == NodeShare("submitit_slurm", 4, 5)


def test_submitit_local_shares_by_its_task_count(env):
    _set(env, SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_JOB_ID="9", SUBMITIT_LOCAL_NTASKS=2,
         SUBMITIT_LOCAL_GLOBALID=1, SUBMITIT_LOCAL_LOCALID=1, SUBMITIT_LOCAL_JOB_NUM_NODES=1,
         SUBMITIT_LOCAL_NODEID=0)
    assert kd.node_share() == NodeShare("submitit_local", 2, None)


# ----------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("share, cores, want", [
    (NodeShare("single", 1, None), 2, 2),
    (NodeShare("torchrun", 2, None), 2, 1),
    (NodeShare("submitit_local", 2, None), 2, 1),
    (NodeShare("submitit_local", 3, None), 2, 1),  # never 0
    (NodeShare("torchrun", 4, None), 18, 4),  # floor: 4 x 4 <= 18
    (NodeShare("submitit_slurm", 4, 5), 20, 5),  # SLURM's cpus per task
    (NodeShare("submitit_slurm", 4, 8), 6, 6),  # but no more than the affinity mask allows
])
def test_default_threads(share, cores, want):
    assert runtime.default_threads(share, cores) == want


def test_choose_threads_divides_the_usable_cores_among_the_node_processes(env):
    cores = len(os.sched_getaffinity(0))
    assert runtime.usable_cores() == cores
    assert runtime.choose_threads()[0] == cores
    _torchrun(env, local_world=2)
    n, why = runtime.choose_threads()
    assert n == max(1, cores // 2) and f"{cores} usable cores / 2 process(es)" in why


def test_the_users_threads_and_omp_num_threads_win(env):
    _torchrun(env, local_world=2)
    assert runtime.choose_threads(3) == (3, "set by threads=N")
    env.setenv("OMP_NUM_THREADS", "5")
    assert runtime.choose_threads() == (5, "set by OMP_NUM_THREADS")
    assert runtime.choose_threads(2)[0] == 2  # threads=N over OMP_NUM_THREADS
    env.setenv("OMP_NUM_THREADS", "many")
    with pytest.raises(ValueError, match="OMP_NUM_THREADS='many' is not a positive integer"):
        runtime.choose_threads()


def test_torchruns_own_omp_num_threads_1_is_not_the_users(env):
    # torchrun sets OMP_NUM_THREADS=1 for its children when it was started without it; pytest
    # (the parent of this check) was started without it too, so the 1 is taken as torchrun's
    _torchrun(env, local_world=2)
    env.setenv("OMP_NUM_THREADS", "1")
    code = ("import os; from kron import runtime; n, why = runtime.choose_threads(); "
            "print(n, why.startswith('set by'))")
    child_env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    child_env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    started_without = "OMP_NUM_THREADS" not in _own_launch_env()
    out = subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True,
                         text=True, check=True, timeout=120).stdout.split()
    cores = len(os.sched_getaffinity(0))
    if started_without:  # the usual case: the default share, not the 1
        assert out == [str(max(1, cores // 2)), "False"]
    else:  # pytest itself was started with OMP_NUM_THREADS: the user's
        assert out == ["1", "True"]


def _own_launch_env() -> set[str]:
    raw = Path(f"/proc/{os.getpid()}/environ").read_bytes().split(b"\0")
    return {e.split(b"=", 1)[0].decode() for e in raw if e}


def test_in_launch_environment_reads_what_a_process_started_with(monkeypatch):
    if not Path(f"/proc/{os.getpid()}/environ").exists():
        pytest.skip("no /proc here")
    monkeypatch.setenv("KRON_SET_AFTER_START", "1")  # os.environ only, not the start env
    assert runtime.in_launch_environment("PATH", os.getpid()) is True
    assert runtime.in_launch_environment("KRON_SET_AFTER_START", os.getpid()) is False
    assert runtime.in_launch_environment("PATH", 2**22 + 12345) is None  # no such process


def test_job_scope_applies_and_notes_the_choice(env):
    _torchrun(env, local_world=2)
    before = torch.get_num_threads()
    with runtime.job_scope(runtime.JobSettings()) as notes:
        want = max(1, runtime.usable_cores() // 2)
        assert torch.get_num_threads() == want
        assert notes[0].startswith(f"threads: {want} (")
        assert runtime.launch_record() == {"threads": want, "launcher": "torchrun"}
    assert torch.get_num_threads() == before


def test_kron_allocator_system_opts_out():
    """A process started with KRON_ALLOCATOR=system keeps its allocator, and says so on every
    call (the set-up is once per process, so this runs in a fresh one)."""
    code = ("from kron.runtime import configure_allocator as c; "
            "print(c()); print(c())")
    child_env = {**os.environ, "KRON_ALLOCATOR": "system", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True,
                         text=True, check=True, timeout=120).stdout.splitlines()
    assert out == ["allocator: left as it is (KRON_ALLOCATOR=system)"] * 2
