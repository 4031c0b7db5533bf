#!/usr/bin/env python
"""Time the GPU kernels of issue 9 against the dense layers they replace (needs a CUDA GPU).

Rows (docs/notes/gpu_kernels.md):

- KronLinear 4096 -> 4096, A (64, 64) x B (64, 64), R = 1 and R = 4, batch 16384: the fused Triton
  kernel (``kron_linear_triton``), the KronLinear layer with ``implementation="triton"`` and
  ``"factored"``, against ``F.linear`` with the composed weight; forward and forward+backward;
  bf16 and fp32 (TF32 for both sides).
- KronConv2d 256 -> 256 3x3, A (16, 16, 1, 1), batch 256, 32x32, channels_last:
  ``pointwise_kron_conv`` (grouped conv + 1x1 mix) and the KronConv2d layer's factored path
  against cuDNN ``F.conv2d`` with the composed kernel; forward and forward+backward.
- dense vs dense (two copies of the same weight): must read 1.00 +- 0.03, else the numbers are
  noise.

Timing: CUDA events around ``--inner`` back-to-back calls (so one launch's host overhead does not
dominate sub-0.1 ms kernels), after warm-up, in ``--rounds`` rounds whose candidate order rotates;
the median over rounds of the per-call time. Every candidate's output is compared with the
baseline's (same factors), so the table also checks bf16 kernels that the CPU interpreter cannot.

    python scripts/bench_gpu_kernels.py [--out bench_gpu_kernels.json]

Prints a markdown table; writes JSON to ``--out`` (default ``$OUT/bench_gpu_kernels.json`` when
``$OUT`` is set, else ``./bench_gpu_kernels.json``). Runs in about a minute on an H100/H200.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

DEVICE = "cuda"

# Targets of issue 9 (speedup of the candidate over the dense baseline), bf16 rows only.
TARGETS = {
    ("linear R=1", "fwd"): 6.0,
    ("linear R=1", "fwd+bwd"): 2.5,
    ("linear R=4", "fwd"): 3.0,
    ("conv 256 3x3 A16x16", "fwd"): 2.0,
    ("conv 256 3x3 A16x16", "fwd+bwd"): 1.3,
}


def time_rounds(fns: dict[str, Callable[[], object]], rounds: int, inner: int,
                warmup: int = 3) -> dict[str, float]:
    """Median milliseconds per call of each callable: kron's one timer (interleaved, rotated
    rounds, CUDA events, ``inner`` back-to-back calls per sample; kron.timing)."""
    from kron.timing import median_times

    times = median_times(fns, "cuda", warmup=warmup, repeats=rounds, number=inner)
    return {name: seconds * 1e3 for name, seconds in times.items()}


def working(fns: dict[str, Callable[[], object]], optional: set[str]) -> dict:
    """``fns`` less the optional candidates whose first call raises (reported, not fatal: the
    layers' wiring is measured here but owned elsewhere)."""
    kept = {}
    for name, fn in fns.items():
        if name in optional:
            try:
                fn()
            except Exception as exc:
                print(f"  {name} skipped: {type(exc).__name__}: {str(exc).splitlines()[0]}")
                continue
        kept[name] = fn
    return kept


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def candidates(x: torch.Tensor, layers: dict[str, torch.nn.Module],
               ops: dict[str, tuple[Callable[[], torch.Tensor], list[torch.Tensor]]]
               ) -> tuple[dict, dict]:
    """Forward and forward+backward callables of each op (``name -> (fn, its inputs)``) and of
    each layer on ``x``; layers whose first call fails are dropped with a line (:func:`working`)."""
    from kron.timing import training_step

    fwd = {**{name: fn for name, (fn, _) in ops.items()},
           **{name: (lambda m=m: m(x)) for name, m in layers.items()}}
    train = {**{name: training_step(fn, inputs) for name, (fn, inputs) in ops.items()},
             **{name: training_step(lambda m=m: m(x), [x, *m.parameters()])
                for name, m in layers.items()}}
    with torch.no_grad():
        fwd = working(fwd, set(layers))
    return fwd, working(train, set(layers))


def linear_rows(rank: int, dtype: torch.dtype, n_rows: int, args) -> list[dict]:
    from kron.layers import KronLinear
    from kron.layers.triton_linear import kron_linear_triton

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(n_rows, 4096, device=DEVICE, dtype=dtype, generator=gen)
    a = (torch.randn(rank, 64, 64, device=DEVICE, generator=gen) / 8).to(dtype)
    b = (torch.randn(rank, 64, 64, device=DEVICE, generator=gen) / 8).to(dtype)
    w = sum(torch.kron(a[r].float(), b[r].float()) for r in range(rank)).to(dtype)
    for t in (x, a, b, w):
        t.requires_grad_()
    layers = {}
    for impl in ("triton", "factored"):
        try:
            layer = KronLinear(4096, 4096, [(64, 64)] * rank, bias=False, implementation=impl,
                               device=DEVICE, dtype=dtype)
            layers[f"KronLinear({impl})"] = layer
        except Exception as exc:  # the layer wiring is another module's; report, go on
            print(f"  KronLinear(implementation={impl!r}) unavailable: {exc}")
    fwd, train = candidates(x, layers, {"dense F.linear": (lambda: F.linear(x, w), [x, w]),
                                        "triton kernel": (lambda: kron_linear_triton(x, a, b),
                                                          [x, a, b])})
    with torch.no_grad():
        ref = F.linear(x, w)
        errs = {"triton kernel": rel_err(kron_linear_triton(x, a, b), ref)}
    # gradient check of the kernel against dense autograd (same factors)
    gk = torch.autograd.grad(kron_linear_triton(x, a, b).float().square().sum() / 2, [x, a, b])
    gd = torch.autograd.grad(F.linear(x.float(), sum(torch.kron(a[r].float(), b[r].float())
                                                     for r in range(rank))).square().sum() / 2,
                             [x, a, b])
    grad_err = max(rel_err(p, q) for p, q in zip(gk, gd))
    case = f"linear R={rank}"
    rows = []
    with torch.no_grad():
        times = time_rounds(fwd, args.rounds, args.inner)
    rows += make_rows(case, "fwd", dtype, n_rows, times, "dense F.linear", errs)
    times = time_rounds(train, args.rounds, args.inner)
    rows += make_rows(case, "fwd+bwd", dtype, n_rows, times, "dense F.linear",
                      {"triton kernel": grad_err})
    return rows


def conv_rows(dtype: torch.dtype, n: int, args) -> list[dict]:
    from kron.layers import KronConv2d
    from kron.layers.kron_conv_grouped import pointwise_kron_conv

    cl = torch.channels_last
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(n, 256, 32, 32, device=DEVICE, generator=gen).to(dtype).contiguous(
        memory_format=cl)
    a = (torch.randn(1, 16, 16, 1, 1, device=DEVICE, generator=gen) / 4).to(dtype)
    b = (torch.randn(1, 16, 16, 3, 3, device=DEVICE, generator=gen) / 12).to(dtype)
    w = torch.kron(a[0].float(), b[0].float()).to(dtype).contiguous(memory_format=cl)
    for t in (x, a, b, w):
        t.requires_grad_()
    layers = {}
    try:
        layer = KronConv2d(256, 256, 3, [(16, 16, 1, 1)], padding=1, bias=False,
                           implementation="factored", device=DEVICE, dtype=dtype)
        layers["KronConv2d(factored)"] = layer.to(memory_format=cl)
    except Exception as exc:
        print(f"  KronConv2d(implementation='factored') unavailable: {exc}")
    fwd, train = candidates(x, layers, {
        "dense cuDNN": (lambda: F.conv2d(x, w, padding=1), [x, w]),
        "grouped+1x1": (lambda: pointwise_kron_conv(x, a, b, 1, 1, 1), [x, a, b])})
    with torch.no_grad():
        errs = {"grouped+1x1": rel_err(fwd["grouped+1x1"](), fwd["dense cuDNN"]())}
        times = time_rounds(fwd, args.rounds, args.inner)
    rows = make_rows("conv 256 3x3 A16x16", "fwd", dtype, n, times, "dense cuDNN", errs)
    times = time_rounds(train, args.rounds, args.inner)
    rows += make_rows("conv 256 3x3 A16x16", "fwd+bwd", dtype, n, times, "dense cuDNN", {})
    return rows


def dense_vs_dense_rows(dtype: torch.dtype, args) -> list[dict]:
    """Two copies of one dense op timed against each other: the noise floor of the table."""
    x = torch.randn(args.linear_batch, 4096, device=DEVICE, dtype=dtype)
    w1 = torch.randn(4096, 4096, device=DEVICE, dtype=dtype) / 64
    w2 = w1.clone()
    xc = torch.randn(args.conv_batch, 256, 32, 32, device=DEVICE, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    k1 = (torch.randn(256, 256, 3, 3, device=DEVICE, dtype=dtype) / 48).contiguous(
        memory_format=torch.channels_last)
    k2 = k1.clone()
    rows = []
    with torch.no_grad():
        t = time_rounds({"a": lambda: F.linear(x, w1), "b": lambda: F.linear(x, w2)},
                        args.rounds, args.inner)
        rows += make_rows("dense vs dense linear", "fwd", dtype, args.linear_batch,
                          {"dense F.linear": t["a"], "dense copy": t["b"]}, "dense F.linear", {})
        t = time_rounds({"a": lambda: F.conv2d(xc, k1, padding=1),
                         "b": lambda: F.conv2d(xc, k2, padding=1)}, args.rounds, args.inner)
        rows += make_rows("dense vs dense conv", "fwd", dtype, args.conv_batch,
                          {"dense cuDNN": t["a"], "dense copy": t["b"]}, "dense cuDNN", {})
    return rows


def make_rows(case: str, mode: str, dtype: torch.dtype, batch: int, times: dict[str, float],
              baseline: str, errs: dict[str, float]) -> list[dict]:
    base = times[baseline]
    target = TARGETS.get((case, mode)) if dtype is torch.bfloat16 else None
    rows = []
    for name, ms in times.items():
        if name == baseline:
            continue
        speedup = base / ms
        rows.append({
            "case": case, "mode": mode, "dtype": str(dtype).removeprefix("torch."),
            "batch": batch, "baseline": baseline, "baseline_ms": round(base, 4),
            "candidate": name, "candidate_ms": round(ms, 4), "speedup": round(speedup, 3),
            "target": target,
            "meets_target": None if target is None or name not in ("triton kernel",
                                                                   "grouped+1x1")
            else speedup >= target,
            "max_rel_err": None if name not in errs else float(f"{errs[name]:.3g}"),
        })
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| case | mode | dtype | batch | candidate | ms | baseline | ms | speedup | target "
            "| rel err |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        target = "" if r["target"] is None else f">= {r['target']}x"
        if r["meets_target"] is not None:
            target += " ok" if r["meets_target"] else " MISSED"
        err = "" if r["max_rel_err"] is None else f"{r['max_rel_err']:.2g}"
        lines.append(
            f"| {r['case']} | {r['mode']} | {r['dtype']} | {r['batch']} | {r['candidate']} | "
            f"{r['candidate_ms']:.4f} | {r['baseline']} | {r['baseline_ms']:.4f} | "
            f"{r['speedup']:.2f}x | {target} | {err} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path.cwd()
    parser.add_argument("--out", type=Path, default=default_dir / "bench_gpu_kernels.json")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--inner", type=int, default=10, help="calls per timed sample")
    parser.add_argument("--linear-batch", type=int, default=16384)
    parser.add_argument("--conv-batch", type=int, default=256)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu_kernels: needs a CUDA GPU (torch.cuda.is_available() is False); "
              "nothing measured", file=sys.stderr)
        return 2
    from kron.layers.triton_linear import triton_available
    if not triton_available():
        print("bench_gpu_kernels: Triton is not importable: pip install 'kron[triton]'",
              file=sys.stderr)
        return 2

    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")  # fp32 rows: TF32 on both sides
    started = time.perf_counter()
    rows: list[dict] = []
    for dtype in (torch.bfloat16, torch.float32):
        print(f"[{time.perf_counter() - started:5.1f}s] {dtype}: dense vs dense", flush=True)
        rows += dense_vs_dense_rows(dtype, args)
        for rank in (1, 4):
            print(f"[{time.perf_counter() - started:5.1f}s] {dtype}: linear R={rank}", flush=True)
            rows += linear_rows(rank, dtype, args.linear_batch, args)
        print(f"[{time.perf_counter() - started:5.1f}s] {dtype}: conv", flush=True)
        rows += conv_rows(dtype, args.conv_batch, args)
        torch.cuda.empty_cache()

    table = markdown(rows)
    print(table)
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "timer": f"cuda_events, {args.inner} calls per sample, median of {args.rounds} "
                 "interleaved rotated rounds after 3 warm-up calls",
        "fp32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_benchmark": True,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({meta['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
