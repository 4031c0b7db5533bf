"""The training entrypoint: results.json, bit-identical resume, DDP == one process, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kron.paths import CONFIG_DIR
from kron.train import CKPT_NAME, train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = CONFIG_DIR
RESULT_KEYS = {"test_acc1", "params", "params_dense", "macs", "macs_dense", "latency_ms",
               "latency_dense_ms", "speedup", "train_images_per_s", "epochs_done", "config",
               "overrides"}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> list[str]:
    """Overrides for a tiny synthetic SVHN (generated once per session) and a tiny net."""
    root = tmp_path_factory.mktemp("synth_svhn")
    return [f"data.root={root}", "data.synth.n_train=192", "data.synth.n_test=96",
            "data.loader.num_workers=0", "model.width=0.125", "batch_size=32",
            "eval_batch_size=96", "measure.batch_size=4", "measure.warmup=1",
            "measure.repeats=2", "progress=false", "wandb.mode=disabled",
            "implementation=factored", "scheduler.warmup_steps=2", "threads=1"]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides)


def run(tmp: Path, overrides: list[str]) -> dict:
    return train(compose_cfg(overrides), tmp, overrides)


def test_one_epoch_writes_complete_results(tiny_data, tmp_path):
    over = [*tiny_data, "epochs=1"]
    res = run(tmp_path, over)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert RESULT_KEYS <= set(saved)
    assert saved["epochs_done"] == 1 and saved["overrides"] == over
    assert saved["config"]["layers"]["features.conv2"]["kind"] == "kron"
    assert 0 <= saved["test_acc1"] <= 100
    # numbers hang together: params from the surgery table, measured speedup = latency ratio
    rows = saved["surgery"]
    assert saved["params_dense"] - saved["params"] == sum(
        r["params_before"] - r["params_after"] for r in rows)
    assert saved["speedup"] == pytest.approx(saved["latency_dense_ms"] / saved["latency_ms"])
    assert saved["macs"] < saved["macs_dense"]
    assert saved["train_images_per_s"] > 0 and res["test_acc1"] == saved["test_acc1"]
    ckpt = torch.load(tmp_path / CKPT_NAME, weights_only=True)  # a checkpoint never runs code
    assert ckpt["epoch"] == 1 and isinstance(ckpt["config"], str)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_dense_layers_is_unmodified_baseline(tiny_data, tmp_path):
    res = run(tmp_path, [*tiny_data, "epochs=1", "layers=dense", "measure.enabled=false"])
    assert res["params"] == res["params_dense"] and res["macs"] == res["macs_dense"]
    assert res["surgery"] == []


def test_killed_then_resumed_equals_uninterrupted(tiny_data, tmp_path):
    over = [*tiny_data, "epochs=2", "measure.enabled=false"]
    full = run(tmp_path / "full", over)
    assert run(tmp_path / "cut", [*over, "stop_after_epochs=1"]) == {}  # "killed" after epoch 1
    resumed = run(tmp_path / "resumed", [*over, f"resume={tmp_path / 'cut'}"])
    a = torch.load(tmp_path / "full" / CKPT_NAME, weights_only=True)
    b = torch.load(tmp_path / "resumed" / CKPT_NAME, weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():  # tensors, and the layers' extra state (auto choices)
        assert torch.equal(v, b["model"][k]) if torch.is_tensor(v) else v == b["model"][k], k

    def curves(res):  # everything but the wall-clock throughput
        return [{k: v for k, v in h.items() if k != "train_images_per_s"} for h in res["history"]]
    assert curves(full) == curves(resumed) and resumed["epochs_done"] == 2
    assert full["test_acc1"] == resumed["test_acc1"]


def test_resume_true_finds_the_run_folder(tiny_data, tmp_path):
    over = [*tiny_data, "epochs=2", "measure.enabled=false"]
    run(tmp_path, [*over, "stop_after_epochs=1"])
    res = run(tmp_path, [*over, "resume=true"])
    assert res["epochs_done"] == 2 and res["history"][0]["epoch"] == 1


def test_resume_true_finds_an_earlier_run_with_same_overrides(tiny_data, tmp_path):
    # Hydra gives each launch a new folder: resume=true looks for the newest earlier run (any
    # day under outputs/runs) whose recorded overrides equal this one's, resume= aside
    over = [*tiny_data, "epochs=2", "measure.enabled=false"]
    first = tmp_path / "runs" / "day1" / "10-00-00_000001"
    train(compose_cfg([*over, "stop_after_epochs=1"]), first, over)  # killed after epoch 1
    (first / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(over), first / ".hydra" / "overrides.yaml")
    other = tmp_path / "runs" / "day1" / "09-00-00_000001"  # different overrides: not it
    train(compose_cfg([*over, "seed=1", "stop_after_epochs=1"]), other, [*over, "seed=1"])
    res = run(tmp_path / "runs" / "day2" / "11-00-00_000001", [*over, "resume=true"])
    epoch1 = torch.load(first / CKPT_NAME, weights_only=True)["history"][0]
    assert res["epochs_done"] == 2
    assert res["history"][0] == epoch1  # carried over (wall-clock throughput included)


def test_init_from_dense_run_fits_swapped_layers(tiny_data, tmp_path):
    # a trained dense run, then a Kronecker run fitted from its checkpoint (`init: dense`) with
    # trivial A shapes (B = the whole weight, an exact fit) and lr 0: the same test loss
    over = [*tiny_data, "epochs=1", "measure.enabled=false", "model.norm=none"]
    dense = run(tmp_path / "dense", [*over, "layers=dense"])
    spec = ("+layers={features.conv3: {kind: kron, terms: [[1, 1, 1, 1]], init: dense},"
            "classifier.fc1: {kind: kron, terms: [[1, 1]], init: dense}}")
    fitted = run(tmp_path / "kron", [*over, "layers=dense", spec, "optimizer.lr=0",
                                     f"init_from={tmp_path / 'dense'}"])
    assert [r["name"] for r in fitted["surgery"]] == ["features.conv3", "classifier.fc1"]
    assert fitted["test_loss"] == pytest.approx(dense["test_loss"], rel=1e-4)
    assert fitted["test_acc1"] == dense["test_acc1"]


def test_cli_run_writes_results_in_hydra_folder(tiny_data, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    subprocess.run([sys.executable, "-m", "kron.train", *tiny_data, "epochs=1",
                    "measure.enabled=false", f"hydra.run.dir={out}"],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    res = json.loads((out / "results.json").read_text())
    assert res["epochs_done"] == 1 and (out / ".hydra" / "config.yaml").is_file()
    assert f"hydra.run.dir={out}" not in res["overrides"] and "epochs=1" in res["overrides"]


@pytest.mark.slow
def test_resume_bit_identical_with_workers_and_augmentation(tiny_data, tmp_path):
    over = [*tiny_data, "epochs=3", "measure.enabled=false", "data.loader.num_workers=2"]
    run(tmp_path / "full", over)
    run(tmp_path / "cut", [*over, "stop_after_epochs=2"])
    run(tmp_path / "cut", [*over, "resume=true"])
    a = torch.load(tmp_path / "full" / CKPT_NAME, weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / CKPT_NAME, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))


@pytest.mark.slow
def test_ddp_two_cpu_processes_equal_one_process(tiny_data, tmp_path):
    # BatchNorm statistics are per process on CPU (no SyncBatchNorm for gloo), so the model
    # has no BN here; no random augmentation, so both runs see identical batches.
    over = [*tiny_data, "epochs=2", "measure.enabled=false", "model.norm=none",
            "data.transforms.train.random_crop=null", "batch_size=32"]
    single = tmp_path / "single"
    run(single, over)
    ddp = tmp_path / "ddp"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "kron.train", *over,
                    f"hydra.run.dir={ddp}"], cwd=ROOT, env=env, check=True, timeout=600)
    a = torch.load(single / CKPT_NAME, weights_only=True)
    b = torch.load(ddp / CKPT_NAME, weights_only=True)
    for k, v in a["model"].items():
        if torch.is_tensor(v):
            torch.testing.assert_close(v, b["model"][k], rtol=1e-5, atol=1e-6)
    res = json.loads((ddp / "results.json").read_text())
    assert res["world_size"] == 2 and res["epochs_done"] == 2
