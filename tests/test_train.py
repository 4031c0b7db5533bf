"""The training entrypoint end to end: results.json (numbers checked against an independent
evaluation), bit-identical resume, channels_last, the layer plan, two jobs in one process,
DDP == one process (also resumed on another world size), the W&B summary, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kron.config_compose import compose_train
from kron.data import build_datasets
from kron.paths import CONFIG_DIR
from kron.recipe.checkpoint import MARKER_NAME
from kron.recipe.settings import ModelSettings
from kron.recipe.steps import RunRecord, surgered_model
from kron.train import CKPT_NAME, train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = CONFIG_DIR
RESULT_KEYS = {"test_acc1", "params", "params_dense", "macs_executed", "macs_dense", "latency_ms",
               "latency_dense_ms", "speedup", "train_images_per_s", "epochs_done", "config",
               "overrides"}


def compose_cfg(overrides: list[str]):
    return compose_train(overrides)


def run(tmp: Path, overrides: list[str]) -> dict:
    return train(compose_cfg(overrides), tmp, overrides)


def test_one_epoch_writes_complete_results(tiny_data, tmp_path):
    over = [*tiny_data, "epochs=1"]
    res = run(tmp_path, over)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert RESULT_KEYS <= set(saved) and saved == json.loads(json.dumps(res, default=str))
    assert saved["epochs_done"] == 1 and saved["overrides"] == over
    assert saved["config"]["layers"]["features.conv2"]["kind"] == "kron"
    assert saved["allocator"].startswith("allocator: ") and saved["world_size"] == 1
    # numbers hang together: params from the surgery table, measured speedup = latency ratio
    rows = saved["surgery"]
    assert saved["params_dense"] - saved["params"] == sum(
        r["params_before"] - r["params_after"] for r in rows)
    assert saved["speedup"] == pytest.approx(saved["latency_dense_ms"] / saved["latency_ms"])
    assert saved["macs_executed"] < saved["macs_dense"]
    ckpt = torch.load(tmp_path / CKPT_NAME, weights_only=True)  # a checkpoint never runs code
    assert ckpt["epoch"] == 1 and isinstance(ckpt["config"], str)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files
    assert not (tmp_path / MARKER_NAME).exists()  # the run is over: no longer marked running
    # the reported test accuracy and loss = an independent evaluation of the saved weights
    cfg = compose_cfg(over)
    model, _, _ = surgered_model(ModelSettings.of(OmegaConf.to_container(cfg, resolve=True)))
    model.load_state_dict(ckpt["model"])
    _, test = build_datasets(cfg.data)
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.tensor([test[i][1] for i in range(len(test))])
    with torch.no_grad():
        logits = model.eval()(x)
    assert saved["test_acc1"] == 100 * (logits.argmax(1) == y).sum().item() / len(y)
    assert saved["test_err1"] == 100 - saved["test_acc1"]
    assert saved["test_loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5)


def test_dense_layers_is_unmodified_baseline(tiny_data, tmp_path):
    res = run(tmp_path, [*tiny_data, "epochs=1", "layers=dense", "measure.enabled=false"])
    assert res["params"] == res["params_dense"] and res["macs_executed"] == res["macs_dense"]
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

    def curves(res):  # everything but wall-clock figures
        return [{k: v for k, v in h.items() if k not in ("train_images_per_s", "train_seconds")}
                for h in res["history"]]
    assert curves(full) == curves(resumed) and resumed["epochs_done"] == 2
    assert full["test_acc1"] == resumed["test_acc1"]


def test_resume_true_finds_the_run_folder(tiny_data, tmp_path):
    over = [*tiny_data, "epochs=2", "measure.enabled=false"]
    run(tmp_path, [*over, "stop_after_epochs=1"])
    res = run(tmp_path, [*over, "resume=true"])
    assert res["epochs_done"] == 2 and res["history"][0]["epoch"] == 1


def test_resume_true_finds_an_earlier_run_of_the_same_config(tiny_data, tmp_path):
    # Hydra gives each launch a new folder: resume=true looks for the newest earlier run (any
    # day under outputs/runs) whose checkpoint holds this run's config, resume= aside; the
    # files beside a checkpoint do not count
    over = [*tiny_data, "epochs=2", "measure.enabled=false"]
    root = tmp_path / "runs"
    first = root / "day1" / "10-00-00_000001"
    train(compose_cfg([*over, "stop_after_epochs=1"]), first, over)  # killed after epoch 1
    other = root / "day1" / "09-00-00_000001"  # another seed: not it, whatever its files say
    train(compose_cfg([*over, "seed=1", "stop_after_epochs=1"]), other, [*over, "seed=1"])
    (other / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(over), other / ".hydra" / "overrides.yaml")
    os.utime(other / CKPT_NAME)  # the newest checkpoint under runs/
    res = train(compose_cfg([*over, "resume=true"]), root / "day2" / "11-00-00_000001",
                [*over, "resume=true"], RunRecord(search_root=root))
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
    assert res["epochs_done"] == 1
    assert f"hydra.run.dir={out}" not in res["overrides"] and "epochs=1" in res["overrides"]
    # kron writes Hydra's record itself, once it holds the folder; train.log holds the log
    assert OmegaConf.load(out / ".hydra" / "overrides.yaml") == res["overrides"]
    assert OmegaConf.load(out / ".hydra" / "config.yaml").epochs == 1
    assert OmegaConf.load(out / ".hydra" / "hydra.yaml").hydra.run.dir == str(out)
    log = (out / "train.log").read_text()
    assert "epoch=1 train_loss=" in log and f"results: {out / 'results.json'}" in log


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / CKPT_NAME, weights_only=True)["model"]


def test_channels_last_on_cpu_trains_like_contiguous(tiny_data, tmp_path):
    # Training compares only without BatchNorm. torch's CPU BatchNorm sums a channels_last
    # batch in another order, about 5e-6 relative error against 1e-7 contiguous (float32, 49k
    # values per channel), and a gradient is not continuous in the activations: a max-pool
    # window whose two largest values are that close, or a ReLU input that close to 0, sends
    # its gradient elsewhere in one run than in the other. A few such flips per step moved the
    # weights 1e-2 relative in one SGD step and the losses 1e-3 relative, at 6 seeds of 10
    # (float64: 1e-14). Without BatchNorm both formats do the same arithmetic (the Kronecker
    # layers run contiguous inside; the dense stem is one conv), so losses agree to rounding.
    over = [*tiny_data, "epochs=2", "measure.enabled=false", "model.norm=none"]
    plain = run(tmp_path / "plain", [*over, "channels_last=false"])
    cl = run(tmp_path / "cl", [*over, "channels_last=true"])
    assert len(cl["history"]) == len(plain["history"]) == 2
    assert plain["history"][1]["train_loss"] < plain["history"][0]["train_loss"]  # it trains
    for p, c in zip(plain["history"], cl["history"]):
        assert c["train_loss"] == pytest.approx(p["train_loss"], rel=1e-5)
        assert c["test_loss"] == pytest.approx(p["test_loss"], rel=1e-5)
        assert abs(c["test_acc1"] - p["test_acc1"]) <= 100 / 96 + 1e-9  # a near-tie: one image
    # with BatchNorm, the forward: a loss is continuous in the activations (a max or a ReLU
    # moves by at most its input's error), so lr=0 losses agree to BatchNorm's 1e-5 or so
    frozen = [*tiny_data, "epochs=1", "measure.enabled=false", "optimizer.lr=0"]
    plain = run(tmp_path / "plain_bn", [*frozen, "channels_last=false"])["history"][0]
    cl = run(tmp_path / "cl_bn", [*frozen, "channels_last=true"])["history"][0]
    assert cl["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-4)
    assert cl["test_loss"] == pytest.approx(plain["test_loss"], rel=1e-4)


def test_plan_layers_pins_auto_layers_and_records_the_plan(tiny_data, tmp_path):
    res = run(tmp_path, [*tiny_data, "epochs=1", "measure.enabled=false",
                         "implementation=auto", "plan_layers=true"])
    kron_layers = {r["name"] for r in res["surgery"] if r["kind"] == "kron"}
    assert set(res["layer_plan"]) == kron_layers
    assert set(res["layer_plan"].values()) <= {"factored", "composed", "triton"}
    ckpt = torch.load(tmp_path / CKPT_NAME, weights_only=True)
    assert not any("plan" in k for k in ckpt["model"])  # a plan is never saved as weights


def _process_state() -> tuple:
    return (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
            torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            torch.get_rng_state(), torch.distributed.is_initialized())


def _same_state(a: tuple, b: tuple) -> bool:
    return a[:4] == b[:4] and torch.equal(a[4], b[4]) and a[5] == b[5]


def test_two_jobs_in_one_process_leave_no_trace(tiny_data, tmp_path):
    # job B, then a different job A (other seed, determinism), then B again: each
    # train() leaves the process as it found it, and B's second run equals its first
    b_over = [*tiny_data, "epochs=1", "measure.enabled=false"]
    a_over = [*b_over, "seed=3", "deterministic=false"]
    before = _process_state()
    run(tmp_path / "b1", b_over)
    assert _same_state(_process_state(), before)
    run(tmp_path / "a", a_over)
    assert _same_state(_process_state(), before)
    run(tmp_path / "b2", b_over)
    assert _same_state(_process_state(), before)
    b1, b2 = _weights(tmp_path / "b1"), _weights(tmp_path / "b2")
    assert all(torch.equal(b1[k], b2[k]) for k in b1)


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
def test_job_in_a_multirun_equals_a_separate_process(tiny_data, tmp_path):
    over = [*tiny_data, "epochs=1", "measure.enabled=false"]
    run(tmp_path / "other", [*over, "seed=5", "deterministic=false", "threads=2"])
    run(tmp_path / "inproc", over)
    sub = tmp_path / "sub"
    subprocess.run([sys.executable, "-m", "kron.train", *over, f"hydra.run.dir={sub}"],
                   cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"}, check=True,
                   capture_output=True, timeout=300)
    a, b = _weights(tmp_path / "inproc"), _weights(sub)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_wandb_summary_carries_the_results_fields(tiny_data, tmp_path):
    from kron.tables.wandb_offline import read_run

    res = run(tmp_path, [*tiny_data, "epochs=1", "wandb.mode=offline"])
    (log,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    summary = read_run(log).summary
    assert set(res) <= set(summary)
    assert summary["surgery"] == res["surgery"] and summary["wandb_id"] == res["wandb_id"]
    for key in ("params", "macs_executed", "macs_dense", "test_acc1", "speedup", "epochs_done"):
        assert summary[key] == pytest.approx(res[key]), key


def _torchrun(over: list[str], out: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "kron.train", *over,
                    f"hydra.run.dir={out}"], cwd=ROOT, env=env, check=True, timeout=600)


@pytest.mark.slow
def test_ddp_two_cpu_processes_equal_one_process(tiny_data, tmp_path):
    # BatchNorm statistics are per process on CPU (no SyncBatchNorm for gloo), so the model
    # has no BN here. Random crops stay on: a sample's augmentation depends on (seed, epoch,
    # index) only, and a global batch holds the same samples at any world size.
    over = [*tiny_data, "epochs=2", "measure.enabled=false", "model.norm=none", "batch_size=32"]
    single = tmp_path / "single"
    run(single, over)
    _torchrun(over, tmp_path / "ddp")
    a, b = _weights(single), _weights(tmp_path / "ddp")
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], rtol=1e-5, atol=1e-6)
    res = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert res["world_size"] == 2 and res["epochs_done"] == 2
    assert not (tmp_path / "ddp" / MARKER_NAME).exists()
    # killed after epoch 1 on two processes, resumed on one: restores what it can, says what
    # it did not, and ends where the uninterrupted run ended
    _torchrun([*over, "stop_after_epochs=1"], tmp_path / "cut")
    resumed = run(tmp_path / "resumed", [*over, f"resume={tmp_path / 'cut'}"])
    assert any("checkpoint from 2 processes resumed on 1" in n for n in resumed["notes"])
    c = _weights(tmp_path / "resumed")
    for k, v in a.items():
        torch.testing.assert_close(v, c[k], rtol=1e-5, atol=1e-6)
