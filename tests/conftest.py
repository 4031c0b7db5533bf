"""Shared test settings.

Tests run tiny tensors, where intra-op threads only add synchronisation: with two OpenMP
threads on a 2-core machine that is also busy with anything else, a spinning barrier can turn a
1 ms op into 50 ms. One thread keeps the suite's time steady. Benchmarks (kron.bench) use the
machine's default threads; this file only affects pytest.
"""

import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> list[str]:
    """Overrides for a tiny synthetic SVHN (generated once per session) and a tiny net."""
    root = tmp_path_factory.mktemp("synth_svhn")
    return [f"data.root={root}", "data.synth.n_train=192", "data.synth.n_test=96",
            "data.loader.num_workers=0", "model.width=0.125", "batch_size=32",
            "eval_batch_size=96", "measure.batch_size=4", "measure.warmup=1",
            "measure.repeats=2", "progress=false", "wandb.mode=disabled",
            "implementation=factored", "scheduler.warmup_steps=2", "threads=1"]


@pytest.fixture
def live_pid():
    """The pid of a live process that is not a kron job (a run marker naming it is held)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()
