"""KronConv2d 256->256 3x3, A (16, 16, 1, 1), batch 32, 32x32 against its dense twin, timed in
this (fresh, plain) process: the two alternate, 8 rounds, median of the last 6, no grad.

    for i in 1 2 3 4 5; do python scripts/fresh_process_conv.py; done

Issue 10's check that CPU speed does not depend on the allocator's mood: run it in several
fresh processes and compare. Nothing but ``kron.layers`` is imported from kron, and kron.layers
changes no process-wide setting, so glibc's allocator is left as it is (the speed comes from
the layer's own buffers: A's matmul writes into a workspace the layer keeps, and B's conv
produces the output; docs/design.md, section 1). ``KRON_ALLOCATOR=system`` changes nothing here;
it only matters for kron's entrypoints (kron.train, kron.bench), which opt in to
``kron.runtime.configure_allocator``.
"""

import statistics
import time

import torch

from kron.layers import KronConv2d

torch.manual_seed(0)
dense = torch.nn.Conv2d(256, 256, 3, padding=1)
kron = KronConv2d(256, 256, 3, [(16, 16, 1, 1)], padding=1, implementation="factored")
x = torch.randn(32, 256, 32, 32)
times: dict[str, list[float]] = {"dense": [], "kron": []}
with torch.no_grad():
    for _ in range(8):
        for name, layer in (("dense", dense), ("kron", kron)):
            start = time.perf_counter()
            layer(x)
            times[name].append(time.perf_counter() - start)
d, k = (statistics.median(times[n][2:]) for n in ("dense", "kron"))
print(f"dense {d * 1e3:.1f} ms  kron {k * 1e3:.1f} ms  speedup {d / k:.2f}x")
