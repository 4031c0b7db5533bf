"""Deployment figures side by side: ``python -m kron.bench deploy``.

    python -m kron.bench deploy [OVERRIDE ...] [--layers NAME] [--batches 1 64] [--rounds 15]
                                [--warmup 3] [--runtimes eager compile onnx] [--json FILE]

A Kronecker net and its dense twin, both built from the training config as a run builds them
(Hydra overrides as for ``kron.train``; default: the default Kronecker SVHN net, ``layers:
svhn_kron``), in eval mode, timed for inference in eager PyTorch, under ``torch.compile`` and
in ONNX Runtime (exported once at batch 1 with a dynamic batch, then run at every batch; the
outputs are checked against eager at each batch within :func:`kron.export.tolerance`, and a
batch that fails or differs reads "fails"). For each batch every runtime and net runs
interleaved in one process (:mod:`kron.timing`, median of the rounds). Prints a Markdown
table; asserts nothing about speed. See docs/design.md, D5.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from kron.fileio import atomic_write_text
from kron.timing import median_times

RUNTIMES = {"eager": "eager PyTorch", "compile": "torch.compile",
            "onnx": "ONNX Runtime (exported at batch 1)"}
NETS = ("dense", "kron")


def build_pair(overrides: list[str]) -> tuple[dict[str, nn.Module], tuple[int, int, int, int]]:
    """The Kronecker net of the training config with ``overrides`` and its dense twin (fresh
    weights, eval mode), and one input's shape."""
    from omegaconf import OmegaConf

    from kron.config_compose import compose_train
    from kron.recipe.settings import ModelSettings
    from kron.recipe.steps import surgered_model

    cfg = compose_train(overrides)
    cfg.init_from = None
    shape = (int(cfg.data.in_channels), int(cfg.data.input_size), int(cfg.data.input_size))
    torch.manual_seed(int(cfg.seed))
    kron_net, _, build_dense = surgered_model(ModelSettings.of(OmegaConf.to_container(
        cfg, resolve=True)))
    return {"dense": build_dense().eval(), "kron": kron_net.eval()}, (1, *shape)


def _no_grad(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return fn(x)

    return run


def _onnx_runners(nets: dict[str, nn.Module], shape: tuple[int, ...], batches: list[int],
                  folder: Path) -> tuple[dict[str, Callable], dict[str, dict[int, str | None]]]:
    """Per net: a function running its ONNX Runtime session, and per batch None (outputs
    matched eager) or why that batch fails."""
    from kron import export

    runners, status = {}, {}
    for name, net in nets.items():
        try:
            program, _ = export.trace(net, shape, dynamic_hw=False)
            path = folder / f"{name}.onnx"
            program.save(str(path))
            session = export.session_for(path)
        except export.ExportError as err:
            status[name] = {b: str(err) for b in batches}
            continue
        checks = export.check(session, net, [(b, *shape[1:]) for b in batches],
                              export.tolerance(net))
        status[name] = {c.shape[0]: None if c.ok else (c.error or f"max diff {c.max_diff:.1e}"
                                                       f" > {c.bound:.1e}") for c in checks}
        input_name = session.get_inputs()[0].name
        runners[name] = lambda x, s=session, n=input_name: s.run(None, {n: x.numpy()})
    return runners, status


def measure(nets: dict[str, nn.Module], shape: tuple[int, ...], batches: list[int],
            runtimes: list[str], rounds: int, warmup: int) -> tuple[list[dict], dict]:
    """One row per (runtime, batch): dense and Kronecker medians in ms, or why it fails."""
    fns: dict[str, dict[str, Callable]] = {}
    status: dict = {}
    if "eager" in runtimes:
        fns["eager"] = dict(nets)
    if "compile" in runtimes:
        fns["compile"] = {k: torch.compile(m) for k, m in nets.items()}
    with tempfile.TemporaryDirectory() as tmp:
        if "onnx" in runtimes:
            fns["onnx"], status = _onnx_runners(nets, shape, batches, Path(tmp))
        rows = []
        for batch in batches:
            x = torch.randn(batch, *shape[1:])
            timed = {f"{rt}/{net}": _no_grad(fn, x) for rt, per in fns.items()
                     for net, fn in per.items()
                     if rt != "onnx" or status[net].get(batch) is None}
            for fn in timed.values():  # compiles and first-call plans, untimed
                fn()
            medians = median_times(timed, "cpu", warmup, rounds)
            for rt in runtimes:
                row = {"runtime": rt, "batch": batch}
                for net in NETS:
                    ms = medians.get(f"{rt}/{net}")
                    row[f"{net}_ms"] = None if ms is None else ms * 1e3
                    if rt == "onnx":
                        row[f"{net}_error"] = status[net].get(batch)
                row["speedup"] = (row["dense_ms"] / row["kron_ms"]
                                  if row["dense_ms"] and row["kron_ms"] else None)
                rows.append(row)
    return rows, status


def _cells(row: dict | None) -> list[str]:
    if row is None or row["dense_ms"] is None or row["kron_ms"] is None:
        fails = [n for n in NETS if row and row.get(f"{n}_error")]
        return [f"{'/'.join(fails) or ''} fails".strip(), "–"]
    return [f"{row['dense_ms']:.2f} / {row['kron_ms']:.2f} ms", f"{row['speedup']:.2f}x"]


def format_table(rows: list[dict], batches: list[int], runtimes: list[str]) -> str:
    """The issue's table: per runtime, per batch ``dense / kron`` and the speedup."""
    head = ["runtime"] + [c for b in batches for c in (f"batch {b} dense / kron", "speedup")]
    by = {(r["runtime"], r["batch"]): r for r in rows}
    body = [[RUNTIMES[rt]] + [c for b in batches for c in _cells(by.get((rt, b)))]
            for rt in runtimes]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in
                     [head, ["---"] * len(head), *body])


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="dense vs Kronecker net in eager, torch.compile and "
                       "ONNX Runtime")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the training config, e.g. "
                   "model.width=0.5 (default: the default Kronecker SVHN net)")
    p.add_argument("--layers", metavar="NAME", help="a layers config (same as layers=NAME)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--rounds", type=int, default=15, help="interleaved timed rounds")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runtimes", nargs="+", choices=list(RUNTIMES), default=list(RUNTIMES))
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    overrides = [*args.overrides, *([f"layers={args.layers}"] if args.layers else [])]
    if "onnx" in args.runtimes:
        from kron.export import ExportError, require_onnxruntime

        try:
            require_onnxruntime()
        except ExportError as err:
            print(f"error: {err} (or leave onnx out of --runtimes)", file=sys.stderr)
            return 2
    from kron.calibrate import load_default

    load_default("cpu")  # this machine's measured cost-model constants, if calibrated
    nets, shape = build_pair(overrides)
    rows, status = measure(nets, shape, args.batches, args.runtimes, args.rounds, args.warmup)
    print(f"# deploy: dense vs Kronecker net ({' '.join(overrides) or 'default config'}), input "
          f"{'x'.join(map(str, shape[1:]))}, {torch.get_num_threads()} CPU threads, median of "
          f"{args.rounds} interleaved rounds\n")
    print(format_table(rows, args.batches, args.runtimes))
    for net, per in status.items():
        for batch, err in per.items():
            print(f"ONNX Runtime {net} at batch {batch}: "
                  + ("outputs match eager" if err is None else f"fails: {err}"))
    if args.json:
        atomic_write_text(args.json, json.dumps(
            {"overrides": overrides, "input_shape": list(shape), "threads":
             torch.get_num_threads(), "rounds": args.rounds, "rows": rows,
             "onnx_status": {n: {str(b): e for b, e in p.items()} for n, p in status.items()}},
            indent=2))
        print(f"wrote {args.json}")
    return 0
