"""Layer benchmark: cost, measured speed and peak memory of Kronecker layers against dense twins.

    python -m kron.bench layers [--device cpu|cuda|all] [--dtype float32 bfloat16 ...]
                                [--repeats N] [--warmup N] [--only TEXT] [--quick] [--json FILE]

For each layer shape, device and dtype: parameters and MACs (counted on the executed forward) of
the dense layer and of the Kronecker layer, the MAC ratio, the median forward (inference, no
grad) and forward+backward times of the dense layer, of an identical copy of it (the control:
dense / copy must read 1.00 within noise), and of the Kronecker layer run factored, composed
(one dense op), by Triton (KronLinear on CUDA) and as ``auto`` (with what auto picks and how far
it is from the fastest of the Kronecker paths), the measured speedups, the efficiency
(speedup / MAC ratio: 1.0 means every saved MAC turned into time), and the peak bytes of one
forward and of composing W. All candidates of a case run interleaved in one process after
warm-up (kron.timing; CUDA events on a GPU). Batches are training-sized per device. A benchmark
prints a table; it asserts nothing. See docs/design.md, D5.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kron.fileio import atomic_write_text
from kron.layers import KronConv2d, KronLinear
from kron.measure import count_macs, count_params, peak_memory
from kron.runtime import configure_allocator
from kron.timing import median_times, timer_name, training_step

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KRON_PATHS = ("factored", "composed", "triton")  # what "auto" is compared against
CONTROL_TOLERANCE = 0.03  # dense / copy beyond 1 +- this: the timings of that row are noise


@dataclass(frozen=True)
class Case:
    """One benchmark row: a dense layer, its Kronecker terms, and the input shape."""

    name: str
    make_dense: Callable[[], nn.Module]
    terms: list[tuple[int, ...]]
    input_shape: tuple[int, ...]
    channels_last: bool = False


def linear_case(n: int, a: tuple[int, int], rank: int, batch: int) -> Case:
    return Case(f"linear {n}x{n} A{a} R={rank}", lambda: nn.Linear(n, n), [a] * rank, (batch, n))


def conv_case(c: int, k: int, a: tuple[int, ...], rank: int, hw: int, batch: int,
              channels_last: bool = False) -> Case:
    def make() -> nn.Module:
        return nn.Conv2d(c, c, k, padding=(k - 1) // 2 if k % 2 else k // 2)

    return Case(f"conv {c}->{c} {k}x{k} @{hw} A{a} R={rank}", make, [a] * rank,
                (batch, c, hw, hw), channels_last)


def paper_cases(device_type: str = "cpu") -> list[Case]:
    """The layer shapes of the paper's nets, at training-size batches for the device: on a GPU
    the batches where it is busy (linear 16384 rows, conv 256 images in channels_last)."""
    gpu = device_type == "cuda"
    rows, images = (16384, 256) if gpu else (256, 32)
    return [
        *(linear_case(4096, (64, 64), r, rows) for r in (1, 2, 4)),
        *(linear_case(1024, (32, 32), r, rows) for r in (1, 4, 16)),
        conv_case(256, 3, (16, 16, 1, 1), 1, 32, images, gpu),
        conv_case(256, 3, (16, 16, 1, 1), 2, 32, images, gpu),
        conv_case(256, 3, (8, 8, 1, 1), 1, 32, images, gpu),
        conv_case(256, 3, (16, 16, 3, 1), 1, 32, images, gpu),  # kernel split: 3x1 in A, 1x3 in B
        conv_case(128, 4, (8, 8, 2, 2), 1, 32, images, gpu),  # kernel split: 2x2 (x) 2x2
    ]


def quick_cases(device_type: str = "cpu") -> list[Case]:
    """Tiny versions of the same kinds of rows, for a smoke run (and the test of this file)."""
    return [
        linear_case(256, (16, 16), 2, 16),
        conv_case(32, 3, (4, 4, 1, 1), 1, 8, 2, device_type == "cuda"),
        conv_case(32, 4, (4, 4, 2, 2), 1, 8, 2),
    ]


def _fwd(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return module(x)

    return run


def _fwd_bwd(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    params = [p for p in module.parameters() if p.requires_grad]
    return training_step(lambda: module(x), [x, *params])


def _kron_layers(dense: nn.Module, case: Case, device: torch.device) -> dict[str, nn.Module]:
    """The Kronecker candidates of one case, built from the dense layer (same values)."""
    build = KronConv2d.from_conv if isinstance(dense, nn.Conv2d) else KronLinear.from_linear
    layers = {path: build(dense, case.terms, implementation=path)
              for path in ("factored", "composed", "auto")}
    if device.type == "cuda" and isinstance(dense, nn.Linear):
        try:
            layers["triton"] = build(dense, case.terms, implementation="triton")
        except (ValueError, ImportError, RuntimeError) as err:
            print(f"  triton skipped for {case.name}: {err}", file=sys.stderr)
    return layers


def _auto_choice(layer: nn.Module, x: torch.Tensor, training: bool) -> str | None:
    """What ``implementation="auto"`` runs on ``x`` in inference or in training."""
    resolve = getattr(layer, "resolved_implementation", None)
    if resolve is None:
        return None
    with torch.set_grad_enabled(training):
        return resolve(x.detach().requires_grad_(training))


def _memory(layers: dict[str, nn.Module], x: torch.Tensor, device: torch.device) -> dict:
    """Peak bytes of one forward (inference) per candidate, and of composing W."""
    out = {}
    for name in ("dense", "factored", "triton"):
        if name in layers:
            mem = peak_memory(_fwd(layers[name], x), device)
            out[f"peak_{name}_bytes"] = mem.peak
            out["output_bytes"] = mem.output
    with torch.no_grad():
        compose = peak_memory(layers["factored"].dense_weight, device)
    out["workspace_factored_bytes"] = out["peak_factored_bytes"] - out["output_bytes"]
    out["weight_bytes"] = compose.output
    out["compose_peak_bytes"] = compose.peak
    out["compose_peak_ratio"] = compose.peak / compose.output
    return out


def run_case(case: Case, device: torch.device, repeats: int, warmup: int,
             dtype: torch.dtype = torch.float32) -> dict:
    """Measure one case on one device in one dtype; returns a flat row (times in ms)."""
    torch.manual_seed(0)
    dense = case.make_dense().to(device)
    layers = {"dense": dense, "dense_copy": copy.deepcopy(dense),
              **_kron_layers(dense, case, device)}
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    for layer in layers.values():
        layer.to(device=device, dtype=dtype, memory_format=fmt)
    x = torch.randn(case.input_shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    x_grad = x.clone().requires_grad_(True)
    for layer in layers.values():  # first calls (plans, workspaces, kernel compiles) untimed
        _fwd(layer, x)()
        _fwd_bwd(layer, x_grad)()
    fwd = median_times({k: _fwd(m, x) for k, m in layers.items()}, device, warmup, repeats)
    fb = median_times({k: _fwd_bwd(m, x_grad) for k, m in layers.items()}, device, warmup,
                      repeats)
    macs_dense = count_macs(dense, x)
    macs_kron = count_macs(layers["factored"], x)
    mac_ratio = macs_dense / macs_kron
    speed = fwd["dense"] / fwd["factored"]
    paths = [p for p in KRON_PATHS if p in layers]
    return {
        "case": case.name,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "batch": case.input_shape[0],
        "channels_last": case.channels_last,
        "params_dense": count_params(dense),
        "params_kron": count_params(layers["factored"]),
        "macs_dense": macs_dense,
        "macs_kron": macs_kron,
        "mac_ratio": mac_ratio,
        **{f"fwd_{k}_ms": v * 1e3 for k, v in fwd.items()},
        **{f"fwdbwd_{k}_ms": v * 1e3 for k, v in fb.items()},
        "control_fwd": fwd["dense"] / fwd["dense_copy"],
        "control_fwdbwd": fb["dense"] / fb["dense_copy"],
        "speedup_fwd": speed,
        "speedup_fwd_auto": fwd["dense"] / fwd["auto"],
        "speedup_fwdbwd": fb["dense"] / fb["factored"],
        "speedup_fwd_triton": fwd["dense"] / fwd["triton"] if "triton" in fwd else None,
        "speedup_fwdbwd_triton": fb["dense"] / fb["triton"] if "triton" in fb else None,
        "efficiency_fwd": speed / mac_ratio,
        "auto_choice": _auto_choice(layers["auto"], x, training=False),
        "auto_choice_train": _auto_choice(layers["auto"], x, training=True),
        "auto_vs_best": fwd["auto"] / min(fwd[p] for p in paths),
        "auto_vs_best_fwdbwd": fb["auto"] / min(fb[p] for p in paths),
        **_memory(layers, x, device),
    }


def _mib(v: float) -> str:
    return f"{v / 2**20:.2f}"


COLUMNS = [
    ("case", "case", "{}"),
    ("batch", "N", "{}"),
    ("params_dense", "params", "{:,}"),
    ("params_kron", "params K", "{:,}"),
    ("mac_ratio", "MAC x", "{:.1f}"),
    ("fwd_dense_ms", "fwd dense", "{:.3f}"),
    ("control_fwd", "dense/copy", "{:.2f}"),
    ("fwd_factored_ms", "fwd K", "{:.3f}"),
    ("fwd_composed_ms", "fwd K-dense", "{:.3f}"),
    ("fwd_triton_ms", "fwd triton", "{:.3f}"),
    ("fwd_auto_ms", "fwd auto", "{:.3f}"),
    ("auto_choice", "auto", "{}"),
    ("speedup_fwd", "speedup", "{:.2f}x"),
    ("speedup_fwd_triton", "speedup triton", "{:.2f}x"),
    ("efficiency_fwd", "eff", "{:.2f}"),
    ("auto_vs_best", "auto/best", "{:.2f}"),
    ("fwdbwd_dense_ms", "f+b dense", "{:.3f}"),
    ("control_fwdbwd", "f+b dense/copy", "{:.2f}"),
    ("fwdbwd_factored_ms", "f+b K", "{:.3f}"),
    ("speedup_fwdbwd", "f+b speedup", "{:.2f}x"),
    ("auto_choice_train", "auto (train)", "{}"),
    ("auto_vs_best_fwdbwd", "f+b auto/best", "{:.2f}"),
    ("peak_dense_bytes", "peak dense MiB", _mib),
    ("peak_factored_bytes", "peak K MiB", _mib),
    ("compose_peak_ratio", "compose peak/W", "{:.2f}"),
]


def _cell(value: object, fmt: str | Callable[[float], str]) -> str:
    if value is None:
        return "-"
    return fmt(value) if callable(fmt) else fmt.format(value)


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the rows (times in ms); columns no row has are left out."""
    cols = [c for c in COLUMNS if any(row.get(c[0]) is not None for row in rows)]
    header = [title for _, title, _ in cols]
    body = [[_cell(row.get(key), fmt) for key, _, fmt in cols] for row in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in body)])


def control_summary(rows: list[dict]) -> str:
    """The dense-vs-copy control of a table in one line: its range, and the rows whose timings
    are noise (the control is off 1.00 by more than ``CONTROL_TOLERANCE``)."""
    parts = []
    for key, label in (("control_fwd", "forward"), ("control_fwdbwd", "forward+backward")):
        values = [r[key] for r in rows]
        off = [r["case"] for r in rows if abs(r[key] - 1) > CONTROL_TOLERANCE]
        verdict = (f"all within 1.00 +- {CONTROL_TOLERANCE}" if not off else
                   f"off by more than {CONTROL_TOLERANCE} in: {'; '.join(off)}")
        parts.append(f"{label} {min(values):.2f}-{max(values):.2f}, {verdict}")
    return "control (dense vs an identical copy): " + ". ".join(parts)


def environment(allocator: str) -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "allocator": allocator,
    }


def bench_layers(args: argparse.Namespace, allocator: str) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available; use --device cpu",
              file=sys.stderr)
        return 2
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.device != "all":
        devices = [args.device]
    rows = []
    env = environment(allocator)
    print(f"# kron layer benchmark  torch {env['torch']}, {env['threads']} CPU threads"
          + (f", {env['cuda']}" if env["cuda"] else ""))
    for device in devices:
        cases = quick_cases(device) if args.quick else paper_cases(device)
        if args.only:
            cases = [c for c in cases if args.only in c.name]
        for dtype_name in args.dtype:
            section = []
            for case in cases:
                row = run_case(case, torch.device(device), args.repeats, args.warmup,
                               DTYPES[dtype_name])
                section.append(row)
                print(f"  measured {row['case']} on {device} in {dtype_name}", file=sys.stderr,
                      flush=True)
            rows.extend(section)
            print(f"\n## {device}, {dtype_name} (times in ms, median of {args.repeats} "
                  f"interleaved rounds, timed by {timer_name(device)}; forward without grad)\n")
            print(format_table(section))
            print(f"\n{control_summary(section)}")
    if args.json:
        atomic_write_text(args.json, json.dumps({"environment": env, "rows": rows}, indent=2))
        print(f"\nwrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kron.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    layers = sub.add_parser("layers", help="Kronecker layers against their dense twins")
    layers.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="all = CPU, and CUDA when present (default)")
    layers.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["float32"],
                        help="parameter and input dtypes to measure in (default float32)")
    layers.add_argument("--repeats", type=int, default=15, help="interleaved timed rounds")
    layers.add_argument("--warmup", type=int, default=3, help="untimed calls of each first")
    layers.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    layers.add_argument("--only", metavar="TEXT", help="only cases whose name contains TEXT")
    layers.add_argument("--quick", action="store_true", help="tiny shapes (smoke run)")
    from kron import bench_deploy, calibrate  # subcommands in their own modules

    bench_deploy.add_parser(sub)
    calibrate.add_parser(sub)
    args = parser.parse_args(argv)
    allocator = configure_allocator()
    print(allocator)
    if args.what != "calibrate":  # calibrate measures the constants: start from the shipped ones
        calibrate.load_defaults()
    if args.what != "layers":
        return args.run(args)
    return bench_layers(args, allocator)


if __name__ == "__main__":
    sys.exit(main())
