"""kron.distributed: launch parsing (torchrun, submitit, single), set-up, and one DDP run per
table row under submitit (two local tasks == torchrun's two processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from kron import distributed as kd
from kron.config_compose import compose_train

ROOT = Path(__file__).resolve().parents[1]
# _TEST_CLUSTER_ is submitit's own switch to a fake cluster: cleared so that it cannot pick
# the JobEnvironment these tests expect
LAUNCH_VARS = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
               "SUBMITIT_EXECUTOR", "_TEST_CLUSTER_"]
SLURM_VARS = {"SLURM_JOB_ID": "777", "SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2",
              "SLURM_NODEID": "1", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
              "SLURM_JOB_NODELIST": "gpu[03-04]"}


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables, whatever the shell running pytest has set."""
    for name in [*LAUNCH_VARS, *SLURM_VARS, "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


class FakeJobEnvironment:
    """What submitit.JobEnvironment() answers inside task 1 of a two-task job on two hosts."""

    job_id, global_rank, local_rank, num_tasks = "42_3", 1, 0, 2
    hostnames = ["hostA", "hostB"]


# ----------------------------------------------------------------------------- parsing
def test_no_launcher_is_a_single_process(clean_env):
    assert kd.detect_launch() == kd.LaunchEnv("single", 0, 1, 0, None, None)


def test_torchrun_environment_is_read(clean_env):
    for k, v in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.2",
                 "MASTER_PORT": "29501"}.items():
        clean_env.setenv(k, v)
    assert kd.detect_launch() == kd.LaunchEnv("torchrun", 3, 4, 1, "10.0.0.2", 29501)


@pytest.mark.parametrize("env, match", [
    ({"RANK": "4", "WORLD_SIZE": "4"}, "rank=4, world_size=4"),
    ({"RANK": "one", "WORLD_SIZE": "4"}, "RANK='one' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, "local_rank=-1"),
])
def test_bad_torchrun_environment_is_a_one_line_error(clean_env, env, match):
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        kd.detect_launch()


def test_submitit_slurm_job_environment_is_read(clean_env):
    # submitit's own SlurmJobEnvironment parses these: rank 5 of 8, master = first node
    clean_env.setenv("SUBMITIT_EXECUTOR", "slurm")
    for k, v in SLURM_VARS.items():
        clean_env.setenv(k, v)
    port = kd.PORT_BASE + zlib.crc32(b"777") % kd.PORT_SPAN
    assert kd.detect_launch() == kd.LaunchEnv("submitit", 5, 8, 1, "gpu03", port)


def test_submitit_job_environment_fake(clean_env):
    import submitit

    clean_env.setenv("SUBMITIT_EXECUTOR", "local")
    clean_env.setattr(submitit, "JobEnvironment", FakeJobEnvironment)
    launch = kd.detect_launch()
    assert launch == kd.LaunchEnv("submitit", 1, 2, 0, "hostA", kd.port_for_job("42_3"))
    clean_env.setenv("MASTER_PORT", "31000")  # the environment overrides the derived address
    clean_env.setenv("MASTER_ADDR", "10.1.1.1")
    assert kd.detect_launch()[4:] == ("10.1.1.1", 31000)


def test_torchrun_inside_a_submitit_job_wins(clean_env):
    clean_env.setenv("SUBMITIT_EXECUTOR", "slurm")
    for k, v in {**SLURM_VARS, "RANK": "0", "WORLD_SIZE": "2"}.items():
        clean_env.setenv(k, v)
    assert kd.detect_launch().launcher == "torchrun"


def test_single_task_submitit_job_is_a_single_process(clean_env):
    clean_env.setenv("SUBMITIT_EXECUTOR", "slurm")
    for k, v in {**SLURM_VARS, "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
                 "SLURM_LOCALID": "0"}.items():
        clean_env.setenv(k, v)
    assert kd.detect_launch() == kd.LaunchEnv("submitit", 0, 1, 0, None, None)


def test_job_ports_are_deterministic_in_range_and_differ_between_rows():
    ports = [kd.port_for_job(f"9001_{i}") for i in range(16)]
    assert ports == [kd.port_for_job(f"9001_{i}") for i in range(16)]
    assert len(set(ports)) == 16
    assert all(kd.PORT_BASE <= p < kd.PORT_BASE + kd.PORT_SPAN for p in ports)


# ----------------------------------------------------------------------------- set-up
def test_single_process_init_starts_no_group(clean_env):
    ctx = kd.init_distributed("cpu")
    assert ctx == kd.DistContext(device=torch.device("cpu"))
    assert not dist.is_initialized() and ctx.is_main and not ctx.is_distributed
    assert kd.broadcast_object({"a": 1}) == {"a": 1} and kd.all_gather_objects(7) == [7]
    kd.barrier()
    kd.cleanup()


@pytest.fixture
def recorded_init(clean_env):
    """init_process_group and cuda.set_device recorded in call order, on a fake 2-GPU node."""
    calls: list[tuple] = []
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setattr(torch.cuda, "device_count", lambda: 2)
    clean_env.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    clean_env.setattr(dist, "is_initialized", lambda: False)
    clean_env.setattr(dist, "init_process_group",
                      lambda backend, **kw: calls.append(("init", backend, kw)))
    return calls


def test_cuda_device_is_set_before_the_group_starts(recorded_init, clean_env):
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        clean_env.setenv(k, v)
    ctx = kd.init_distributed("cuda")
    assert recorded_init == [("set_device", torch.device("cuda", 1)), ("init", "nccl", {})]
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.device) == (
        1, 2, "nccl", torch.device("cuda", 1))


def test_submitit_task_joins_the_group_at_the_first_host(recorded_init, clean_env):
    import submitit

    clean_env.setenv("SUBMITIT_EXECUTOR", "local")
    clean_env.setattr(submitit, "JobEnvironment", FakeJobEnvironment)
    ctx = kd.init_distributed("auto")
    port = kd.port_for_job("42_3")
    assert recorded_init == [("set_device", torch.device("cuda", 0)), ("init", "nccl", {
        "init_method": f"tcp://hostA:{port}", "rank": 1, "world_size": 2})]
    assert ctx == kd.DistContext(1, 2, 0, "hostA", port, "nccl", torch.device("cuda", 0),
                                 "submitit")


def test_a_group_already_up_is_reused_only_if_it_matches(clean_env):
    clean_env.setattr(dist, "is_initialized", lambda: True)
    clean_env.setattr(dist, "get_rank", lambda: 1)
    clean_env.setattr(dist, "get_world_size", lambda: 2)
    clean_env.setattr(dist, "get_backend", lambda: "gloo")
    clean_env.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("second init"))
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}.items():
        clean_env.setenv(k, v)
    assert kd.init_distributed("cpu") == kd.DistContext(1, 2, 0, "h", 1, "gloo",
                                                        torch.device("cpu"), "torchrun")
    clean_env.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match=r"\(rank 1 of 2\) is already up"):
        kd.init_distributed("cpu")


@pytest.mark.parametrize("device, match", [("tpu", "device='tpu'"),
                                           ("cuda", "no CUDA device")])
def test_bad_device_is_a_one_line_error(clean_env, device, match):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match=match):
        kd.init_distributed(device)


@pytest.mark.parametrize("count, local_rank, want", [(4, 2, 2), (1, 3, 0)])
def test_each_task_gets_its_gpu(recorded_init, clean_env, count, local_rank, want):
    """Every task sees all the node's GPUs: the local rank's; one GPU bound to each task
    (SLURM gpus_per_task): that one."""
    clean_env.setattr(torch.cuda, "device_count", lambda: count)
    for k, v in {"RANK": local_rank, "WORLD_SIZE": 4, "LOCAL_RANK": local_rank}.items():
        clean_env.setenv(k, str(v))
    assert kd.init_distributed("cuda").device == torch.device("cuda", want)
    assert recorded_init == [("set_device", torch.device("cuda", want)), ("init", "nccl", {})]


def test_fewer_gpus_than_local_ranks_is_an_error_before_any_group(recorded_init, clean_env):
    for k, v in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}.items():
        clean_env.setenv(k, v)
    with pytest.raises(ValueError, match="gpus_per_node"):
        kd.init_distributed("cuda")  # the fixture's node has 2 GPUs
    assert recorded_init == []


def test_seed_for_rank():
    seeds = [kd.seed_for_rank(7, r) for r in range(64)]
    assert seeds[0] == 7 and len(set(seeds)) == 64
    with pytest.raises(ValueError, match="rank=-1"):
        kd.seed_for_rank(7, -1)


def test_cublas_workspace_is_set_only_before_cuda_starts(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.warns(RuntimeWarning, match="before CUDA initialised"):
        assert kd.set_cublas_workspace() is False
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert kd.set_cublas_workspace() is True
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # a user's own value is kept
    assert kd.set_cublas_workspace() is True and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


# ----------------------------------------------------------------------------- real groups
def _task_collectives() -> dict:
    """Runs inside each submitit task: join the group, exchange objects, leave."""
    torch.set_num_threads(1)
    ctx = kd.init_distributed("cpu")
    shared = kd.broadcast_object(f"folder-of-rank-{ctx.rank}")
    gathered = kd.all_gather_objects(ctx.rank * 10)
    t = torch.tensor([float(ctx.rank + 1)])
    dist.all_reduce(t)
    kd.barrier()
    main = kd.is_main()
    kd.cleanup()
    return {"ctx": (ctx.rank, ctx.world_size, ctx.local_rank, ctx.backend, ctx.launcher),
            "shared": shared, "gathered": gathered, "sum": t.item(), "main": main,
            "up_after_cleanup": dist.is_initialized()}


@pytest.mark.slow
def test_two_submitit_local_tasks_form_one_group(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    # the tasks unpickle _task_collectives by reference: they must find this test module
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(Path(__file__).parent), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(tasks_per_node=2, timeout_min=5, gpus_per_node=0)
    job = executor.submit(_task_collectives)
    out = job.results()
    assert [o["ctx"] for o in out] == [(0, 2, 0, "gloo", "submitit"), (1, 2, 1, "gloo", "submitit")]
    assert all(o["shared"] == "folder-of-rank-0" and o["gathered"] == [0, 10] for o in out)
    assert [o["sum"] for o in out] == [3.0, 3.0] and [o["main"] for o in out] == [True, False]
    assert not any(o["up_after_cleanup"] for o in out)


# ----------------------------------------------------------------------------- end to end
def _tiny(root: Path) -> list[str]:
    """A tiny run on synthetic SVHN, no BatchNorm and no random augmentation (see
    test_train.test_ddp_two_cpu_processes_equal_one_process), threads left to the launch."""
    return [f"data.root={root}", "data.synth.n_train=128", "data.synth.n_test=64",
            "data.loader.num_workers=0", "model.width=0.125", "model.norm=none",
            "data.transforms.train.random_crop=null", "batch_size=32", "eval_batch_size=64",
            "epochs=1", "measure.enabled=false", "progress=false", "wandb.mode=disabled",
            "implementation=factored", "scheduler.warmup_steps=2", "device=cpu"]


@pytest.mark.slow
def test_submitit_two_tasks_equal_torchrun_two_processes(tmp_path):
    """Threads at their defaults (no ``threads=``, no OMP_NUM_THREADS): both launches give each
    process the same share of the cores, record it and their launcher, and train bit-identically."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

    from kron.data import build_datasets

    over = _tiny(tmp_path / "data")
    build_datasets(compose_train(over).data)  # render the data once, up front
    env = {**os.environ, "WANDB_MODE": "disabled"}
    for name in [*LAUNCH_VARS, "OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"]:
        env.pop(name, None)
    sweep, single = tmp_path / "submitit", tmp_path / "torchrun"
    subprocess.run([sys.executable, "-m", "kron.train", "-m", "launcher=submitit_local",
                    "hydra.launcher.tasks_per_node=2", f"hydra.sweep.dir={sweep}", *over],
                   cwd=tmp_path, env=env, check=True, timeout=600)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", "2", "-m", "kron.train", f"hydra.run.dir={single}",
                    *over], cwd=tmp_path, env=env, check=True, timeout=600)
    # one run folder, one results.json, written by rank 0 of a world of two
    assert sorted(p.relative_to(sweep).as_posix() for p in sweep.rglob("results.json")) == [
        "0/results.json"]
    a = json.loads((sweep / "0" / "results.json").read_text())
    b = json.loads((single / "results.json").read_text())
    assert a["world_size"] == b["world_size"] == 2 and a["epochs_done"] == 1
    share = max(1, len(os.sched_getaffinity(0)) // 2)  # 1 on the 2-core machine
    assert (a["launcher"], a["threads"]) == ("submitit_local", share)
    assert (b["launcher"], b["threads"]) == ("torchrun", share)
    assert a["test_acc1"] == b["test_acc1"] and a["test_loss"] == pytest.approx(b["test_loss"])
    wa = torch.load(sweep / "0" / "last.pt", weights_only=True)["model"]
    wb = torch.load(single / "last.pt", weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    for k, v in wa.items():
        torch.testing.assert_close(v, wb[k], rtol=0, atol=0, msg=k)
