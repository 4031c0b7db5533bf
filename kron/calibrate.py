"""Measure the cost model's constants on this device: ``python -m kron.bench calibrate``.

    python -m kron.bench calibrate [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                                   [--repeats N] [--warmup N] [--quick] [--out FILE]

:mod:`kron.layers.cost_model` prices a forward in dense MACs: ``penalty(kind) * MACs`` per
factored shape group plus ``op_overhead`` per launched op. This times what it prices, in one
process, interleaved (:mod:`kron.timing`): for each case a dense layer and its Kronecker twin
run factored (and, on CUDA, by the Triton kernel once :mod:`kron.layers.triton_selfcheck` has
verified it), in inference and for a training step. With ``s`` = seconds per MAC of the dense
layer, a case's factored cost in dense MACs is ``t_factored / s``; less the op overhead of its
groups' ops, divided by its MACs, it is one penalty sample for the kind the layer's own
workload names. A kind's penalty is the geometric mean of its samples. The op overhead is
the median time of a 1x1 matmul in units of ``s`` of the fastest dense case.

The file (JSON, written atomically) is read by ``cost_model.load_calibration(path)``; the
entrypoints call it when the file exists (:func:`default_path`). ``compose_extra_per_element``
is not measured and keeps the shipped value. See docs/design.md, D5.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

from kron.bench import DTYPES, Case, conv_case, linear_case
from kron.fileio import atomic_write_text
from kron.layers import KronConv2d, KronLinear, cost_model
from kron.measure import count_macs
from kron.timing import median_times, training_step

FORMAT = "kron-cost-calibration/1"


def default_path(device_type: str) -> Path:
    """Where calibrations live: ``$KRON_CALIBRATION_DIR`` (default ``~/.cache/kron``)."""
    root = os.environ.get("KRON_CALIBRATION_DIR") or Path.home() / ".cache" / "kron"
    return Path(root) / f"cost_model_{device_type}.json"


def load_default(device_type: str) -> Path | None:
    """Install this device type's calibration if its file exists (saying so on stderr);
    returns its path or None. The call the entrypoints make before building layers:
    kron-compress, kron-export and ``kron.bench deploy`` make it for "cpu"."""
    path = default_path(device_type)
    if not path.is_file():
        return None
    cost_model.load_calibration(str(path))
    print(f"cost model: {device_type} constants from {path}", file=sys.stderr)
    return path


def load_defaults() -> list[Path]:
    """:func:`load_default` for the CPU, and for CUDA when a GPU is present: what
    ``kron.train`` and ``kron.bench`` call at start."""
    kinds = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [p for p in (load_default(k) for k in kinds) if p is not None]


def cases(device_type: str, quick: bool) -> list[Case]:
    """One or more cases per kind the model prices: linear, 1x1-A conv, spatial-A conv."""
    if quick:
        return [linear_case(64, (8, 8), 1, 8), conv_case(16, 3, (4, 4, 1, 1), 1, 8, 2),
                conv_case(16, 3, (4, 4, 3, 1), 1, 8, 2)]
    rows, images = (16384, 256) if device_type == "cuda" else (256, 32)
    return [linear_case(4096, (64, 64), 1, rows), linear_case(1024, (32, 32), 2, rows),
            conv_case(256, 3, (16, 16, 1, 1), 1, 32, images),
            conv_case(256, 3, (8, 8, 1, 1), 1, 32, images),
            conv_case(256, 3, (16, 16, 3, 1), 1, 32, images)]


def _candidates(dense: nn.Module, case: Case, device: torch.device, dtype: torch.dtype
                ) -> dict[str, nn.Module]:
    from kron.layers import triton_selfcheck

    build = KronConv2d.from_conv if isinstance(dense, nn.Conv2d) else KronLinear.from_linear
    out = {"factored": build(dense, case.terms, implementation="factored")}
    if (device.type == "cuda" and isinstance(dense, nn.Linear)
            and triton_selfcheck.verified(device, dtype)):
        out["triton"] = build(dense, case.terms, implementation="triton")
    return out


def measure_case(case: Case, device: torch.device, dtype: torch.dtype, repeats: int,
                 warmup: int) -> dict:
    """Times of the dense layer and its Kronecker candidates (inference and training step),
    and the dense MACs and seconds per MAC."""
    torch.manual_seed(0)
    dense = case.make_dense().to(device, dtype)
    layers = {"dense": dense, **_candidates(dense, case, device, dtype)}
    for m in layers.values():
        m.to(device, dtype)
    x = torch.randn(case.input_shape, device=device, dtype=dtype)
    xg = x.clone().requires_grad_(True)

    def fwd(m):
        return lambda: m(x)

    with torch.no_grad():
        t_inf = median_times({k: fwd(m) for k, m in layers.items()}, device, warmup, repeats)
    t_train = median_times({k: training_step(lambda m=m: m(xg), [xg, *m.parameters()])
                            for k, m in layers.items()}, device, warmup, repeats)
    return {"case": case.name, "input_shape": list(case.input_shape),
            "dense_macs": count_macs(dense, x), "inference_s": t_inf, "training_s": t_train,
            "workloads": {k: [(g.kind, g.macs, g.ops) for g in
                              m.workload(case.input_shape, device.type).factored[k]]
                          for k, m in layers.items() if k != "dense"}}


def _op_seconds(device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    a = torch.ones(1, 1, device=device, dtype=dtype)
    return median_times({"op": lambda: torch.mm(a, a)}, device, 3, repeats, number=50)["op"]


def penalties(rows: list[dict], op_overhead: float) -> dict[str, list[float]]:
    """Per kind: ``[inference, training]`` penalties, geometric means over the cases."""
    samples: dict[str, list[list[float]]] = {}
    for row in rows:
        for impl, groups in row["workloads"].items():
            kinds = {g[0] for g in groups}
            macs, ops = sum(g[1] for g in groups), sum(g[2] for g in groups)
            pair = []
            for mode in ("inference_s", "training_s"):
                per_mac = row[mode]["dense"] / row["dense_macs"]
                cost = row[mode][impl] / per_mac - op_overhead * ops
                pair.append(max(cost / macs, 1e-3))
            for kind in kinds:  # a case's groups share one kind
                samples.setdefault(kind, []).append(pair)
    return {k: [math.exp(statistics.fmean(math.log(p[i]) for p in v)) for i in (0, 1)]
            for k, v in samples.items()}


def calibrate(device: torch.device, dtype: torch.dtype, repeats: int, warmup: int,
              quick: bool) -> dict:
    """Measure and return the calibration record (see the module docstring)."""
    rows = [measure_case(c, device, dtype, repeats, warmup) for c in cases(device.type, quick)]
    fastest = min(r["inference_s"]["dense"] / r["dense_macs"] for r in rows)
    op_overhead = _op_seconds(device, dtype, repeats) / fastest
    return {"format": FORMAT, "device_type": device.type,
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else "cpu"),
            "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "repeats": repeats, "op_overhead": op_overhead,
            "penalty": penalties(rows, op_overhead),
            "compose_extra_per_element": cost_model.constants_for(
                device.type).compose_extra_per_element,
            "cases": rows}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="measure the cost-model constants on this device")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: float32 on CPU, bfloat16 "
                   "on CUDA (as training runs there under autocast)")
    p.add_argument("--repeats", type=int, default=15, help="interleaved timed rounds")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke run)")
    p.add_argument("--out", metavar="FILE", help="default: $KRON_CALIBRATION_DIR or "
                   "~/.cache/kron, cost_model_<device>.json")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available; use --device cpu",
              file=sys.stderr)
        return 2
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    record = calibrate(device, dtype, args.repeats, args.warmup, args.quick)
    out = Path(args.out) if args.out else default_path(device.type)
    atomic_write_text(out, json.dumps(record, indent=2))
    shipped = cost_model.constants_for(device.type)
    print(f"# cost-model constants on {record['device_name']} ({record['dtype']}), median of "
          f"{args.repeats} rounds; shipped values in brackets")
    print(f"op_overhead {record['op_overhead']:.3g} MACs  [{shipped.op_overhead:.3g}]")
    for kind, (inf, train) in record["penalty"].items():
        old = shipped.penalty.get(kind, (float("nan"),) * 2)
        print(f"penalty {kind:16s} inference {inf:6.2f} [{old[0]:.1f}]  training {train:6.2f} "
              f"[{old[1]:.1f}]")
    print(f"wrote {out} (installed by kron.layers.cost_model.load_calibration)")
    return 0
