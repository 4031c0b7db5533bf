"""Shared test settings.

Tests run tiny tensors, where intra-op threads only add synchronisation: with two OpenMP
threads on a 2-core machine that is also busy with anything else, a spinning barrier can turn a
1 ms op into 50 ms. One thread keeps the suite's time steady. Benchmarks (kron.bench) use the
machine's default threads; this file only affects pytest.
"""

import os

import torch

os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(1)
