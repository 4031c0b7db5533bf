"""The training recipe's steps on their own: config schema, job state, optimizer groups, the
schedule, evaluation, run markers and resume across world sizes (kron/recipe, kron/runtime)."""

from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kron.cli_check import cli_config_error
from kron.config_compose import compose_train
from kron.config_schema import ConfigError, check_train_config
from kron.distributed import DistContext
from kron.errors import OutputFolderError
from kron.layers import KronLinear
from kron.recipe.checkpoint import (
    CKPT_NAME,
    MARKER_NAME,
    find_resume,
    restore_rng,
    rng_state,
    run_marker,
    running_elsewhere,
    save_checkpoint,
)
from kron.recipe.fit import build_optimizer, evaluate, lr_at, param_groups
from kron.recipe.steps import Job
from kron.runtime import JobSettings, job_scope

ROOT = Path(__file__).resolve().parents[1]


def composed(overrides: list[str] | None = None) -> dict:
    return OmegaConf.to_container(compose_train(overrides or []), resolve=True)


def cpu_job(tmp_path: Path) -> Job:
    return Job(tmp_path, DistContext(), None, False, "allocator: test")


# ----------------------------------------------------------------------------- config schema
def test_default_config_passes_the_schema():
    check_train_config(composed())


@pytest.mark.parametrize("override,message", [
    ("optimizer.lr=abc", "optimizer.lr: expected a float, got 'abc'"),
    ("epochs=2.5", "epochs: expected an int, got 2.5"),
    ("model.width=wide", "model.width: expected a float, got 'wide'"),
    ("optimizer.nesterov=3", "optimizer.nesterov: expected a bool (true/false), got 3"),
    ("data.loader.pin_memory=maybe",
     "data.loader.pin_memory: expected a bool (true/false) or one of 'auto', got 'maybe'"),
    ("scheduler.name=linear",
     "scheduler.name: expected one of 'cosine', 'step', 'constant', got 'linear'"),
    ("+optimizer.betas=[0.9,0.99]", "optimizer.betas: not an argument of SGD.__init__"),
    ("+model.depth=3", "model.depth: not an argument of svhn_net"),
    ("eval_every=0", "eval_every: expected a value >= 1, got 0"),
    ("data.loader.num_workers=-1", "data.loader.num_workers: expected a value >= 0, got -1"),
    ("model.width=-1", "model.width: expected a value > 0, got -1"),
    ("model.width=0", "model.width: expected a value > 0, got 0"),
    ("stop_after_epochs=-1", "stop_after_epochs: expected a value >= 1, got -1"),
    ("stop_after_epochs=0", "stop_after_epochs: expected a value >= 1, got 0"),
    ("epochs=0", "epochs: expected a value >= 1, got 0"),
    ("batch_size=0", "batch_size: expected a value >= 1, got 0"),
    ("eval_batch_size=0", "eval_batch_size: expected a value >= 1, got 0"),
    ("optimizer.lr=-0.1", "optimizer.lr: expected a value >= 0, got -0.1"),
    ("implementation=bogus", "implementation: expected one of 'auto', 'factored', 'composed', "
                             "'triton' or null, got 'bogus'"),
    ("resume_force=maybe", "resume_force: expected a bool (true/false), got 'maybe'"),
])
def test_schema_names_the_key_and_the_expected_type(override, message):
    with pytest.raises(ConfigError) as err:
        check_train_config(composed([override]))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_schema_rejects_unknown_keys_at_every_level():
    for override, key in (("+foo=1", "foo"), ("+measure.repeat=3", "measure.repeat"),
                          ("+data.loader.batch_size=8", "data.loader.batch_size")):
        with pytest.raises(ConfigError, match=rf"^{key}: unknown key; known keys here: "):
            check_train_config(composed([override]))


def test_cli_check_gives_one_line_for_hydra_errors_and_sweeps():
    assert cli_config_error(["foo=1"]) == (
        "foo: unknown key (no such key in the config; check the spelling, or add a new one "
        "with +foo=...)")
    assert cli_config_error(["seed=0,1", "epochs=1"]) is None  # a sweep: its first value
    assert cli_config_error(["epochs=1,x"]) is None  # first value fine; the job checks the rest
    assert cli_config_error(["-m", "optimizer.lr=0.1,abc"]) is None
    assert cli_config_error(["optimizer.lr=abc,0.1"]) == "optimizer.lr: expected a float, got 'abc'"
    assert cli_config_error(["--config-name=other", "foo=1"]) is None  # left to Hydra


def test_cli_check_composes_with_the_command_lines_searchpath(tmp_path):
    """A generated table's row (a preset in a folder added by hydra.searchpath) is checked
    with that folder, as Hydra will compose it: the page runs one such row at a time."""
    folder = tmp_path / "conf" / "preset" / "mine"
    folder.mkdir(parents=True)
    (folder / "row.yaml").write_text("# @package _global_\nepochs: 3\n")
    argv = ["-m", "preset=mine/row", "seed=0,1", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
            "hydra.sweep.dir=/nowhere"]
    assert cli_config_error(argv) is None
    assert "Could not find 'preset/mine/row'" in cli_config_error(argv[:3])
    bad = [*argv, "epochs=x"]
    assert cli_config_error(bad) == "epochs: expected an int, got 'x'"


@pytest.mark.slow  # a fresh interpreter importing torch: seconds, more on a busy machine
def test_cli_wrong_type_is_one_line_on_stderr_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "kron.train", "optimizer.lr=abc"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 2
    assert proc.stderr == "error: optimizer.lr: expected a float, got 'abc'\n"
    assert proc.stdout == ""


# ----------------------------------------------------------------------------- job state
def test_job_scope_sets_and_restores_process_state(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32)
    rngs = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    with job_scope(JobSettings(seed=3, deterministic=not before[1], cuda=True, threads=2)):
        assert torch.get_num_threads() == 2
        assert torch.are_deterministic_algorithms_enabled() == (not before[1])
        assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == (":4096:8" if not before[1] else None)
        assert torch.backends.cuda.matmul.allow_tf32
        first = torch.rand(3)
        torch.manual_seed(3)
        assert torch.equal(first, torch.rand(3))  # seeded with the job's seed
    after = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32)
    assert after == before and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert torch.equal(torch.get_rng_state(), rngs[0]) and random.getstate() == rngs[1]
    assert np.array_equal(np.random.get_state()[1], rngs[2])


def test_job_scope_restores_even_when_the_job_fails():
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"), job_scope(JobSettings(threads=threads + 1)):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == threads


# ----------------------------------------------------------------------------- optimizer
class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.kron = KronLinear(8, 4, [[2, 2]], implementation="factored")
        self.head = nn.Linear(4, 2)


@pytest.mark.parametrize("decay_factors", [True, False])
def test_no_weight_decay_on_biases_and_norms(decay_factors):
    net = Small()
    groups = {g["name"]: g for g in param_groups(net, 0.1, decay_factors)}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    factors = {id(p) for n, p in net.kron.named_parameters() if n != "bias"}
    weights = {id(net.conv.weight), id(net.head.weight)}
    no_decay = {id(net.conv.bias), id(net.bn.weight), id(net.bn.bias), id(net.kron.bias),
                id(net.head.bias)}
    assert ids["decay"] == weights | (factors if decay_factors else set())
    assert ids["no_decay"] == no_decay | (set() if decay_factors else factors)
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert len(factors) == 2  # one A and one B


def test_build_optimizer_uses_the_config_arguments():
    net = Small()
    opt = build_optimizer({"_target_": "torch.optim.SGD", "lr": 0.2, "momentum": 0.5,
                           "weight_decay": 0.01, "decay_kron_factors": False}, net)
    assert isinstance(opt, torch.optim.SGD)
    assert [(g["name"], g["lr"], g["momentum"], g["weight_decay"]) for g in opt.param_groups] \
        == [("decay", 0.2, 0.5, 0.01), ("no_decay", 0.2, 0.5, 0.0)]
    frozen = Small().requires_grad_(False)
    frozen.head.requires_grad_(True)
    assert sum(len(g["params"]) for g in param_groups(frozen, 0.1, True)) == 2


def test_learning_rate_schedules():
    cos = {"name": "cosine", "warmup_steps": 4, "min_lr_ratio": 0.1}
    assert [lr_at(s, 104, 1.0, cos) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, 104, 1.0, cos) == 1.0
    assert lr_at(54, 104, 1.0, cos) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert lr_at(104, 104, 1.0, cos) == pytest.approx(0.1)
    step = {"name": "step", "warmup_steps": 0, "milestones": [0.5, 0.75], "gamma": 0.1}
    assert [lr_at(s, 100, 1.0, step) for s in (49, 50, 74, 75)] == pytest.approx(
        [1.0, 0.1, 0.1, 0.01])
    with pytest.raises(ValueError, match="unknown scheduler.name 'linear'"):
        lr_at(0, 10, 1.0, {"name": "linear", "warmup_steps": 0})


# ----------------------------------------------------------------------------- evaluation
def test_evaluate_counts_exactly_and_reads_the_device_once(tmp_path, monkeypatch):
    # logits = one-hot rows chosen per sample, so top-1/top-5 hits and the loss are known
    logits = torch.tensor([[5.0, 1, 0, 0, 0, 0], [0, 5.0, 1, 0, 0, 0], [1, 0, 0, 0, 0, 5.0],
                           [0, 0, 0, 5.0, 4, 0], [1, 2, 3, 4, 5, 6]])
    labels = torch.tensor([0, 2, 0, 4, 0])
    model = nn.Identity()
    loader = list(DataLoader(TensorDataset(logits, labels), batch_size=2))  # 3 batches
    calls = {"item": 0, "tolist": 0}
    item, tolist = torch.Tensor.item, torch.Tensor.tolist

    def counting(name, fn):
        def wrapped(self, *a, **k):
            calls[name] += 1
            return fn(self, *a, **k)
        return wrapped

    monkeypatch.setattr(torch.Tensor, "item", counting("item", item))
    monkeypatch.setattr(torch.Tensor, "tolist", counting("tolist", tolist))
    ev = evaluate(model, loader, cpu_job(tmp_path), num_classes=6)
    monkeypatch.undo()
    assert calls == {"item": 0, "tolist": 1}  # three batches, one read of the counts
    top5 = logits.topk(5, 1).indices == labels[:, None]
    assert ev["acc1"] == 100 * 1 / 5 and ev["acc5"] == 100 * top5.any(1).sum().item() / 5
    assert ev["loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item())


# ----------------------------------------------------------------------------- live runs
def _marker(folder: Path, pid: int, host: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER_NAME).write_text(json.dumps({"host": host or socket.gethostname(),
                                                  "pid": pid}))


def test_running_elsewhere_tells_live_from_dead_runs(tmp_path, live_pid):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    _marker(tmp_path / "live", live_pid)
    _marker(tmp_path / "dead", int(dead))
    _marker(tmp_path / "remote", 1, host="another-host")
    _marker(tmp_path / "mine", os.getpid())
    assert f"in use by pid {live_pid}" in running_elsewhere(tmp_path / "live")
    assert running_elsewhere(tmp_path / "dead") is None
    assert "on another-host" in running_elsewhere(tmp_path / "remote")
    assert running_elsewhere(tmp_path / "mine") is None
    assert running_elsewhere(tmp_path / "none") is None


def test_run_marker_lives_as_long_as_the_block(tmp_path, live_pid):
    with pytest.raises(KeyError), run_marker(tmp_path):
        info = json.loads((tmp_path / MARKER_NAME).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        raise KeyError("the job failed")
    assert not (tmp_path / MARKER_NAME).exists()
    _marker(tmp_path, live_pid)
    with pytest.raises(OutputFolderError, match=f"in use by pid {live_pid}"), run_marker(tmp_path):
        pass


def test_resume_true_never_picks_a_running_run(tmp_path, live_pid, capsys):
    config = composed(["epochs=2"])
    root = tmp_path / "runs"
    for name, age in (("older", 100), ("newer", 10)):
        run = root / "day" / name
        save_checkpoint(run / CKPT_NAME, config=OmegaConf.to_yaml(config))
        os.utime(run / CKPT_NAME, (1e9 - age, 1e9 - age))
    out = root / "day2" / "now"
    newer = root / "day/newer" / CKPT_NAME
    assert find_resume(True, out, {**config, "resume": True}, root) == newer
    _marker(root / "day" / "newer", live_pid)
    assert find_resume(True, out, config, root) == root / "day/older" / CKPT_NAME
    assert f"skipping {root / 'day/newer'} is in use by pid {live_pid}" \
        in capsys.readouterr().out
    _marker(root / "day" / "older", live_pid)
    assert find_resume(True, out, config, root) is None


# ----------------------------------------------------------------------------- RNG on resume
def _states(n: int) -> list[dict]:
    out = []
    for r in range(n):
        torch.manual_seed(100 + r)
        np.random.seed(100 + r)
        random.seed(100 + r)
        out.append(rng_state(torch.device("cpu")))
    return out


def test_resume_on_fewer_processes_restores_what_it_can():
    saved = _states(2)
    note = restore_rng(saved, rank=0, world=1, device=torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), saved[0]["torch"])
    assert note == ("resume: checkpoint from 2 processes resumed on 1: model, optimizer and RNG "
                    "streams of ranks 0-0 restored, RNG streams of saved ranks 1-1 dropped "
                    "(data order and augmentation follow seed, epoch and sample)")


def test_resume_on_more_processes_keeps_fresh_streams_for_new_ranks():
    saved = _states(2)
    torch.manual_seed(7)
    fresh = torch.get_rng_state()
    note = restore_rng(saved, rank=2, world=3, device=torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), fresh)  # rank 2 had no saved stream
    assert "ranks 2-2 keep their own fresh seeds" in note
    assert restore_rng(saved, rank=1, world=2, device=torch.device("cpu")) is None
    assert torch.equal(torch.get_rng_state(), saved[1]["torch"])
