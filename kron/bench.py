"""Layer benchmark: cost and measured speed of Kronecker layers against their dense twins.

    python -m kron.bench layers [--device cpu|cuda|all] [--repeats N] [--json FILE] [--quick]

For each layer shape: parameters and MACs of the dense layer and of the Kronecker layer, MAC
ratio, median forward (inference, no grad) and forward+backward times of the dense layer and of
the Kronecker layer run factored, composed-dense and auto, measured speedups, and efficiency =
speedup / MAC ratio (1.0 means the factored layer turns every saved MAC into time). All
implementations of one case are timed alternately in one process after warm-up (kron.timing).
A benchmark prints a table; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kron.layers import KronConv2d, KronLinear, autotune
from kron.measure import count_macs, count_params
from kron.timing import median_times


@dataclass(frozen=True)
class Case:
    """One benchmark row: a dense layer, its Kronecker terms, and the input shape."""

    name: str
    make_dense: Callable[[], nn.Module]
    terms: list[tuple[int, ...]]
    input_shape: tuple[int, ...]


def linear_case(n: int, a: tuple[int, int], rank: int, batch: int) -> Case:
    return Case(f"linear {n}x{n} A{a} R={rank}", lambda: nn.Linear(n, n), [a] * rank, (batch, n))


def conv_case(c: int, k: int, a: tuple[int, ...], rank: int, hw: int, batch: int) -> Case:
    def make() -> nn.Module:
        return nn.Conv2d(c, c, k, padding=(k - 1) // 2 if k % 2 else k // 2)

    return Case(f"conv {c}->{c} {k}x{k} @{hw} A{a} R={rank}", make, [a] * rank,
                (batch, c, hw, hw))


def paper_cases() -> list[Case]:
    """The shapes the layers issue asks for (DESIGN.md, issue 3)."""
    return [
        *(linear_case(4096, (64, 64), r, 256) for r in (1, 2, 4)),
        *(linear_case(1024, (32, 32), r, 256) for r in (1, 4, 16)),
        conv_case(256, 3, (16, 16, 1, 1), 1, 32, 32),
        conv_case(256, 3, (16, 16, 1, 1), 2, 32, 32),
        conv_case(256, 3, (8, 8, 1, 1), 1, 32, 32),
        conv_case(256, 3, (16, 16, 3, 1), 1, 32, 32),  # kernel split: 3x1 in A, 1x3 in B
        conv_case(128, 4, (8, 8, 2, 2), 1, 32, 32),  # kernel split: 2x2 (x) 2x2
    ]


def quick_cases() -> list[Case]:
    """Tiny versions of the same kinds of rows, for a smoke run (and the test of this file)."""
    return [
        linear_case(256, (16, 16), 2, 16),
        conv_case(32, 3, (4, 4, 1, 1), 1, 8, 2),
        conv_case(32, 4, (4, 4, 2, 2), 1, 8, 2),
    ]


def _fwd(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return module(x)

    return run


def _fwd_bwd(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    params = [p for p in module.parameters() if p.requires_grad]

    def run() -> object:
        out = module(x)
        return torch.autograd.grad(out, [x, *params], torch.ones_like(out))

    return run


def run_case(case: Case, device: torch.device, repeats: int, warmup: int) -> dict:
    """Measure one case on one device; returns a flat row (times in milliseconds)."""
    torch.manual_seed(0)
    dense = case.make_dense().to(device)
    layers = {"dense": dense}
    for impl in ("factored", "composed", "auto"):
        kind = KronConv2d.from_conv if isinstance(dense, nn.Conv2d) else KronLinear.from_linear
        layers[impl] = kind(dense, case.terms, implementation="dense" if impl == "composed"
                            else impl)
    x = torch.randn(case.input_shape, device=device)
    x_grad = x.clone().requires_grad_(True)
    autotune.clear_cache()
    for layer in layers.values():  # let "auto" make its choices, outside the timed runs
        _fwd(layer, x)()
        _fwd_bwd(layer, x_grad)()
    fwd = median_times({k: _fwd(m, x) for k, m in layers.items()}, device, warmup, repeats)
    fb = median_times({k: _fwd_bwd(m, x_grad) for k, m in layers.items()}, device, warmup,
                      repeats)
    macs_dense = count_macs(dense, case.input_shape)
    macs_kron = count_macs(layers["factored"], case.input_shape)
    mac_ratio = macs_dense / macs_kron
    speed = fwd["dense"] / fwd["factored"]
    return {
        "case": case.name,
        "device": str(device),
        "params_dense": count_params(dense),
        "params_kron": count_params(layers["factored"]),
        "macs_dense": macs_dense,
        "macs_kron": macs_kron,
        "mac_ratio": mac_ratio,
        **{f"fwd_{k}_ms": v * 1e3 for k, v in fwd.items()},
        **{f"fwdbwd_{k}_ms": v * 1e3 for k, v in fb.items()},
        "speedup_fwd": speed,
        "speedup_fwd_auto": fwd["dense"] / fwd["auto"],
        "speedup_fwdbwd": fb["dense"] / fb["factored"],
        "efficiency_fwd": speed / mac_ratio,
        "auto_vs_best": fwd["auto"] / min(fwd["factored"], fwd["composed"]),
        "auto_choice": layers["auto"].last_implementation,
    }


COLUMNS = [
    ("case", "case", "{}"),
    ("params_dense", "params", "{:,}"),
    ("params_kron", "params K", "{:,}"),
    ("mac_ratio", "MAC x", "{:.1f}"),
    ("fwd_dense_ms", "fwd dense", "{:.2f}"),
    ("fwd_factored_ms", "fwd K", "{:.2f}"),
    ("fwd_composed_ms", "fwd K-dense", "{:.2f}"),
    ("fwd_auto_ms", "fwd auto", "{:.2f}"),
    ("speedup_fwd", "speedup", "{:.2f}x"),
    ("efficiency_fwd", "eff", "{:.2f}"),
    ("auto_vs_best", "auto/best", "{:.2f}"),
    ("fwdbwd_dense_ms", "f+b dense", "{:.2f}"),
    ("fwdbwd_factored_ms", "f+b K", "{:.2f}"),
    ("speedup_fwdbwd", "f+b speedup", "{:.2f}x"),
]


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the rows (times in ms)."""
    header = [title for _, title, _ in COLUMNS]
    body = [[fmt.format(row[key]) for key, _, fmt in COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in body)])


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def bench_layers(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.device != "all":
        devices = [args.device]
    cases = quick_cases() if args.quick else paper_cases()
    if args.only:
        cases = [c for c in cases if args.only in c.name]
    rows = []
    env = environment()
    print(f"# kron layer benchmark  torch {env['torch']}, {env['threads']} CPU threads"
          + (f", {env['cuda']}" if env["cuda"] else ""))
    for device in devices:
        for case in cases:
            row = run_case(case, torch.device(device), args.repeats, args.warmup)
            rows.append(row)
            print(f"  measured {row['case']} on {device}", file=sys.stderr, flush=True)
        print(f"\n## {device} (times in ms, median of {args.repeats}; forward without grad)\n")
        print(format_table([r for r in rows if r["device"] == device]))
    if args.json:
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=2)
        os.replace(tmp, args.json)
        print(f"\nwrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kron.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    layers = sub.add_parser("layers", help="Kronecker layers against their dense twins")
    layers.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="all = CPU, and CUDA when present (default)")
    layers.add_argument("--repeats", type=int, default=15)
    layers.add_argument("--warmup", type=int, default=3)
    layers.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    layers.add_argument("--only", metavar="TEXT", help="only cases whose name contains TEXT")
    layers.add_argument("--quick", action="store_true", help="tiny shapes (smoke run)")
    args = parser.parse_args(argv)
    return bench_layers(args)


if __name__ == "__main__":
    sys.exit(main())
