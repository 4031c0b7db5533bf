"""Runs that cannot be corrupted (issue 18): a refused run changes nothing in the live run's
folder, resume takes only a checkpoint of the same run and searches no higher than its root,
every user mistake is one line, writes are durable and leave no temporary files behind."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kron.config_compose import compose_train
from kron.errors import CheckpointError, OutputFolderError
from kron.fileio import atomic_write, atomic_write_text
from kron.layers.errors import FactorizationError
from kron.recipe.checkpoint import (
    CKPT_NAME,
    MARKER_NAME,
    find_resume,
    load_checkpoint,
    save_checkpoint,
)
from kron.recipe.steps import RunRecord
from kron.train import search_root, train, unusable_folder

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def tiny(tiny_data) -> list[str]:
    """The tiny synthetic SVHN and net of tests/conftest.py, no latency measurement."""
    return [*tiny_data, "measure.enabled=false", "epochs=2"]


def cfg_of(overrides: list[str]):
    return compose_train(overrides)


def run(folder: Path, overrides: list[str], root: Path | None = None) -> dict:
    return train(cfg_of(overrides), folder, overrides, RunRecord(search_root=root))


@pytest.fixture(scope="module")
def cut(tiny, tmp_path_factory) -> Path:
    """A run of the tiny config "killed" after epoch 1 of 2 (seed 0, SGD, Kronecker layers)."""
    folder = tmp_path_factory.mktemp("cut")
    assert run(folder, [*tiny, "stop_after_epochs=1"]) == {}
    return folder


def digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (names relative to it)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kron.train", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300, **kw)


# ----------------------------------------------------------------------------- refused runs
def test_refused_run_leaves_the_live_runs_folder_byte_identical(tiny, tmp_path, live_pid):
    # A: a run's folder (record, log, checkpoint), held by a live process on this host
    a = tmp_path / "A"
    files = {"config.yaml": "seed: 0\n", "overrides.yaml": "- seed=0\n", "hydra.yaml": "x\n"}
    train(cfg_of([*tiny, "stop_after_epochs=1"]), a, tiny, RunRecord(files))
    (a / MARKER_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": live_pid}))
    before = digest(a)
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "train.log",
            CKPT_NAME, MARKER_NAME} <= set(before)
    # B: another seed, same folder, through Hydra -- refused in one line, A's folder untouched
    b = cli([*tiny, "seed=7", f"hydra.run.dir={a}"])
    assert b.returncode == 2 and b.stdout == ""
    assert b.stderr == (f"error: run folder {a} is in use by pid {live_pid} on "
                        f"{socket.gethostname()} (delete {a / MARKER_NAME} if that job is "
                        "gone); use another hydra.run.dir\n")
    assert digest(a) == before


@pytest.mark.slow
def test_refused_run_beside_a_running_process_changes_nothing(tiny, tmp_path):
    # two real training processes: A trains (stopped with SIGSTOP once it holds its folder and
    # has written a checkpoint, so nothing of A's moves while B tries), B is refused
    a = tmp_path / "A"
    proc = subprocess.Popen([sys.executable, "-m", "kron.train", *tiny, "epochs=500",
                             f"hydra.run.dir={a}"], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (a / CKPT_NAME).is_file() and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGSTOP)
        before = digest(a)
        b = cli([*tiny, "seed=7", f"hydra.run.dir={a}"])
        assert b.returncode == 2 and f"in use by pid {proc.pid}" in b.stderr
        assert len(b.stderr.splitlines()) == 1
        assert digest(a) == before
        assert OmegaConf.load(a / ".hydra" / "config.yaml").seed == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_multirun_jobs_write_their_own_record_and_log(tiny, tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli(["-m", *[o for o in tiny if o != "epochs=2"], "epochs=1", "seed=0,1",
                f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr
    for job in (0, 1):
        folder = sweep / str(job)
        assert OmegaConf.load(folder / ".hydra" / "config.yaml").seed == job
        assert f"seed={job}" in OmegaConf.load(folder / ".hydra" / "overrides.yaml")
        assert OmegaConf.load(folder / ".hydra" / "hydra.yaml").hydra.job.num == job
        assert "epoch=1 train_loss=" in (folder / "train.log").read_text()


# ----------------------------------------------------------------------------- resume
@pytest.mark.parametrize("change,key", [
    (["seed=7"], "seed=0 in the checkpoint, 7 here"),
    (["optimizer=adamw"], 'optimizer._target_="torch.optim.SGD" in the checkpoint, '
                          '"torch.optim.AdamW" here'),
    (["layers=dense"], 'layers.features.conv2.kind="kron" in the checkpoint, (absent) here'),
    (["epochs=3"], "epochs=2 in the checkpoint, 3 here"),
])
def test_resume_path_refuses_another_runs_checkpoint(tiny, cut, tmp_path, change, key):
    with pytest.raises(CheckpointError) as err:
        run(tmp_path, [*tiny, *change, f"resume={cut}"])
    msg = str(err.value)
    assert msg == (f"resume: {cut / CKPT_NAME} is another run's checkpoint: {key}; resume a "
                   "checkpoint of this run, or pass resume_force=true to load it anyway")
    assert not (tmp_path / CKPT_NAME).exists()


def test_resume_force_loads_what_fits_and_refuses_what_cannot(tiny, cut, tmp_path):
    # another optimizer: the weights load, the optimizer starts fresh, and the run says so
    res = run(tmp_path / "adamw", [*tiny, "optimizer=adamw", f"resume={cut}",
                                   "resume_force=true"])
    assert res["epochs_done"] == 2 and res["history"][0] == load_checkpoint(
        cut / CKPT_NAME)["history"][0]
    assert any("optimizer state not restored" in n for n in res["notes"])
    # other layers: the weights cannot load: one line naming the first parameter
    with pytest.raises(CheckpointError, match=r"^resume: the model in .* does not fit this one "
                       r"\(features\.conv2\.weight is not in it\)"):
        run(tmp_path / "dense", [*tiny, "layers=dense", f"resume={cut}", "resume_force=true"])


def test_resume_true_takes_only_a_checkpoint_of_this_config(tiny, cut, tmp_path, capsys):
    root = tmp_path / "runs"
    other = root / "day" / "seed0"
    other.mkdir(parents=True)
    (other / CKPT_NAME).write_bytes((cut / CKPT_NAME).read_bytes())
    # seed 7 finds nothing (the seed-0 checkpoint is another run's) and starts fresh
    res = run(root / "day2" / "seed7", [*tiny, "seed=7", "resume=true"], root)
    assert res["epochs_done"] == 2 and res["history"][0]["epoch"] == 1
    assert "no earlier checkpoint of this run (same config)" in capsys.readouterr().out
    saved = torch.load(root / "day2" / "seed7" / CKPT_NAME, weights_only=True)
    assert OmegaConf.create(saved["config"]).seed == 7 and len(saved["config_hash"]) == 64
    assert saved["history"][0] != load_checkpoint(cut / CKPT_NAME)["history"][0]
    # seed 0 resumes the seed-0 run
    res = run(root / "day2" / "seed0", [*tiny, "resume=true"], root)
    assert "resumed from" in capsys.readouterr().out
    assert res["history"][0] == load_checkpoint(cut / CKPT_NAME)["history"][0]


def test_resume_true_never_searches_above_its_root(tiny, cut, tmp_path):
    config = OmegaConf.to_container(cfg_of(tiny), resolve=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / CKPT_NAME).write_bytes((cut / CKPT_NAME).read_bytes())
    new = tmp_path / "newrun"  # a run folder one level below the searched folder
    assert find_resume(True, new, config, None) is None  # a folder the user named: itself only
    root = tmp_path / "runs"
    root.mkdir()
    assert find_resume(True, root / "day" / "t", config, root) is None
    assert find_resume(True, new, config, tmp_path) == tmp_path / "elsewhere" / CKPT_NAME


def test_search_root_is_the_day_folders_parent_or_the_sweep_folder(tmp_path):
    def hc(run_dir: str, hydra_overrides: list[str]):
        return OmegaConf.create({"runtime": {"output_dir": run_dir},
                                 "sweep": {"dir": str(tmp_path / "sweep")},
                                 "overrides": {"hydra": hydra_overrides}})
    default = str(tmp_path / "outputs" / "runs" / "2026-01-01" / "10-00-00_000000")
    assert search_root(hc(default, []), multirun=False) == tmp_path / "outputs" / "runs"
    assert search_root(hc("/scratch/newrun", ["hydra.run.dir=/scratch/newrun"]), False) is None
    assert search_root(hc(default, []), multirun=True) == tmp_path / "sweep"
    # a run folder set elsewhere (a local config) without the day layout: itself only
    assert search_root(hc("/scratch/newrun", []), multirun=False) is None


def test_unreadable_checkpoints_are_one_line_naming_the_path(tiny, cut, tmp_path):
    data = (cut / CKPT_NAME).read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, why in (("truncated.pt", "RuntimeError: PytorchStreamReader failed reading zip "
                       "archive: failed finding central directory"), ("empty.pt", "empty file")):
        with pytest.raises(CheckpointError) as err:
            run(tmp_path / "r", [*tiny, f"resume={tmp_path / name}"])
        assert str(err.value) == (f"cannot read checkpoint {tmp_path / name} ({why}); it is "
                                  "truncated or not a kron checkpoint: delete it or resume "
                                  "from another")


def test_checkpoint_without_a_config_resumes_with_a_warning(tiny, cut, tmp_path):
    ckpt = load_checkpoint(cut / CKPT_NAME)
    del ckpt["config"], ckpt["config_hash"]
    torch.save(ckpt, tmp_path / "old.pt")
    res = run(tmp_path / "r", [*tiny, f"resume={tmp_path / 'old.pt'}"])
    assert res["history"][0] == ckpt["history"][0] and res["epochs_done"] == 2
    assert (f"resume: warning: {tmp_path / 'old.pt'} holds no config (written by an older "
            "kron), so it could not be checked to belong to this run") in res["notes"]


# ----------------------------------------------------------------------------- one-line errors
def test_impossible_layers_spec_fails_before_the_data_is_built(tiny, tmp_path):
    fresh = tmp_path / "data"  # the synthetic data would be generated here
    over = [*[o for o in tiny if not o.startswith("data.root=")], f"data.root={fresh}",
            "layers=dense", "+layers={features.conv2: {kind: kron, terms: [[5, 2, 1, 1]]}}"]
    with pytest.raises(FactorizationError, match=r"^surgery refused \(strict\).*features.conv2 "
                       r"Conv2d\(4->16, 3x3\).*invalid Kronecker term A shape \(5, 2, 1, 1\)"):
        run(tmp_path / "r", over)
    assert not fresh.exists()


def test_disk_full_names_the_checkpoint_and_says_no_space(tiny, tmp_path, monkeypatch):
    def full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OutputFolderError) as err:
        run(tmp_path, tiny)
    assert str(err.value) == (f"cannot write {tmp_path / CKPT_NAME}: no space left on the "
                              "device (free some space or write elsewhere, e.g. "
                              "hydra.run.dir=...)")
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / MARKER_NAME).exists()


def test_unwritable_folder_is_one_line(tmp_path, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    monkeypatch.setattr("tempfile.mkstemp", denied)
    with pytest.raises(OutputFolderError, match=r"^cannot write .*results\.json: permission "
                       r"denied \(make the folder writable or write elsewhere"):
        atomic_write_text(tmp_path / "results.json", "{}")
    assert isinstance(OutputFolderError("x"), OSError)  # callers catching OSError still do


def test_run_folder_that_cannot_be_created_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("")
    proc = cli(["epochs=1", f"hydra.run.dir={tmp_path / 'afile' / 'run'}"])
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr == (
        f"error: cannot create {tmp_path / 'afile' / 'run'}: {tmp_path / 'afile'} is a file, "
        "not a folder (choose another hydra.run.dir)\n")
    assert unusable_folder(tmp_path / "new" / "run") is None
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    assert unusable_folder(tmp_path / "new" / "run") == (
        f"cannot create {tmp_path / 'new' / 'run'}: {tmp_path} is not writable")


def test_bad_value_is_one_line_on_the_command_line():
    # (every range check: tests/test_recipe.py; the command line runs the same check)
    proc = cli(["implementation=bogus"])
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr == (
        "error: implementation: expected one of 'auto', 'factored', 'composed', 'triton' or null, "
        "got 'bogus'\n")


@pytest.mark.slow
def test_kron_debug_shows_the_traceback(tiny, cut, tmp_path):
    proc = cli([*tiny, "seed=7", f"resume={cut}", f"hydra.run.dir={tmp_path / 'r'}"])
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith(f"error: resume: {cut / CKPT_NAME} is another run's")
    proc = subprocess.run([sys.executable, "-m", "kron.train", *tiny, "seed=7",
                           f"resume={cut}", f"hydra.run.dir={tmp_path / 'r'}"], cwd=ROOT,
                          env={**ENV, "KRON_DEBUG": "1", "HYDRA_FULL_ERROR": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    assert "kron.errors.CheckpointError" in proc.stderr


# ----------------------------------------------------------------------------- durable, tidy
def test_atomic_writes_fsync_the_file_then_the_folder(tmp_path, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name file descriptors")
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(
        os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1])
    dest = tmp_path / "results.json"
    atomic_write(dest, lambda t: t.write_text("{}"))
    assert len(synced) == 2 and Path(synced[0]).name.startswith(".results.json.")
    assert Path(synced[0]).parent == tmp_path and Path(synced[1]) == tmp_path
    assert dest.read_text() == "{}"


def test_a_new_start_removes_temporary_files_of_a_killed_writer(tiny, cut, tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / CKPT_NAME).write_bytes((cut / CKPT_NAME).read_bytes())
    stale = folder / f".{CKPT_NAME}.k1ll3d.tmp"  # what SIGKILL during a save leaves
    stale.write_bytes(b"\0" * 1000)
    res = run(folder, [*tiny, "resume=true"])
    assert res["epochs_done"] == 2 and not stale.exists()
    assert f"removed {stale} (left by a killed writer)" in (folder / "train.log").read_text()


def test_save_checkpoint_leaves_old_or_new_never_half(tmp_path, monkeypatch):
    path = tmp_path / CKPT_NAME
    save_checkpoint(path, epoch=1)

    def crash(obj, f):
        f.write(b"half")
        raise KeyboardInterrupt  # interrupted mid-write
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, epoch=2)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1 and not list(tmp_path.glob(".*.tmp"))
