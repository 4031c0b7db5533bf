"""Compress a trained net in one call: swap its layers at a budget, fit them, report, save.

    kron-compress resnet18 --param-ratio 0.1 [--weights W.pt] [--init fit] [--onnx]
    kron-compress RUN_DIR --layers layers.yaml --out small.pt
    kron-compress mypkg.nets:build --mac-ratio 0.2 --input-size 96

:func:`compress` applies a surgery spec (``kron.models.surgery``'s format): every matched
layer is planned before any is swapped, a layer that cannot take its entry is left dense with
the reason instead of stopping the whole run, and every fitted layer reports its fit error
``||W - W_hat||_F / ||W||_F`` against the trained dense weight (0 is exact; with ``init: fit``
each layer is the best approximation of its kind and size the fits reach). :func:`save`
writes the state dict with the exact per-layer spec that rebuilds it (every budget already
resolved into terms or ranks) and the record of the source net; :func:`load` rebuilds and
reloads it. See docs/design.md, D2 and D3.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from kron import model_source
from kron.fileio import atomic_write
from kron.layers.factory import INITS
from kron.layers.kinds import layer_kinds
from kron.measure import count_macs, count_params
from kron.models.surgery import KEPT, SWAPPED, SurgeryRow, apply_surgery

FORMAT = "kron-compressed/1"


@dataclass
class LayerReport(SurgeryRow):
    """The surgery's row of one matched layer, plus ``left_dense``: why it stayed dense
    (``None`` when it was swapped)."""

    left_dense: str | None = None


@dataclass
class Report:
    """What :func:`compress` did: per-layer rows, whole-net totals (MACs per image) and the
    resolved spec that rebuilds the compressed net."""

    rows: list[LayerReport]
    params: tuple[int, int]
    macs: tuple[int, int]
    spec: dict[str, dict[str, Any]]


def resolved_entry(kind: str, module: nn.Module) -> dict[str, Any]:
    """The spec entry that rebuilds ``module`` exactly (budgets resolved into terms/ranks)."""
    if kind == "kron" and hasattr(module, "terms"):
        return {"kind": "kron", "terms": [list(map(int, t)) for t in module.terms],
                "implementation": str(getattr(module, "implementation", "auto"))}
    if kind == "tucker" and hasattr(module, "ranks"):
        return {"kind": "tucker", "ranks": [int(r) for r in module.ranks]}
    if hasattr(module, "rank"):
        return {"kind": kind, "rank": int(module.rank)}
    raise ValueError(f"cannot record how to rebuild a {type(module).__name__} (kind {kind!r})")


def _report_row(row: SurgeryRow) -> LayerReport:
    """The surgery's row as a compression report row (``left_dense`` says why it stayed)."""
    out = LayerReport(**asdict(row))
    if row.status == KEPT:
        out.left_dense = "kind: dense in the spec"
    elif row.status != SWAPPED:
        out.left_dense = row.reason or "left dense"
    return out


def compress(model: nn.Module, spec: Mapping[str, Mapping[str, Any]],
             input_shape: tuple[int, ...] = (1, 3, 224, 224)) -> Report:
    """Swap ``model``'s layers in place as ``spec`` says (surgery's format and inits:
    ``fit``, ``dense``, ``scratch``) and report what happened.

    The surgery plans every matched layer before it swaps any: one that cannot take its entry
    stays dense and its row says why. ``input_shape`` is one input ``(1, C, H, W)``; MACs are
    per image: the dense net's as executed, less what the swapped layers' factored forwards
    save (``auto`` layers may still run composed: see their ``resolved_implementation``).
    """
    params_before = count_params(model)
    macs_before = count_macs(model, tuple(input_shape))
    rows = [_report_row(r) for r in apply_surgery(model, spec, tuple(input_shape))]
    resolved = {}
    for row in rows:
        if row.left_dense is None:
            new = model.get_submodule(row.name)
            resolved[row.name] = resolved_entry(row.kind, getattr(new, "in_proj", new))
    saved = sum(r.macs_before - r.macs_after for r in rows if r.left_dense is None)
    return Report(rows, (params_before, count_params(model)), (macs_before, macs_before - saved),
                  resolved)


def _fmt_err(e: float | None) -> str:
    return "-" if e is None else f"{e:.3f}"


def format_report(report: Report) -> str:
    """The per-layer table, the layers left dense with their reasons, and the totals."""
    head = ("layer", "kind", "shape", "detail", "params", "->", "MACs/img", "->", "fit err")
    swapped = [r for r in report.rows if r.left_dense is None]
    lines = [(r.name, r.kind, r.shape, r.detail, f"{r.params_before:,}", f"{r.params_after:,}",
              f"{r.macs_before:,}", f"{r.macs_after:,}", _fmt_err(r.fit_error)) for r in swapped]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 4 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*row) for row in [head, *lines]]
    dense = [r for r in report.rows if r.left_dense is not None]
    if dense:
        out.append(f"\nleft dense ({len(dense)}):")
        out += [f"  {r.name} {r.shape}: {r.left_dense}" for r in dense]
    (p0, p1), (m0, m1) = report.params, report.macs
    errs = [r.fit_error for r in swapped if r.fit_error is not None]
    out.append(f"\ntotal: params {p0:,} -> {p1:,} ({p1 / p0:.3f}x), MACs/img {m0:,} -> {m1:,} "
               f"({m1 / max(m0, 1):.3f}x); {len(swapped)} layers swapped, {len(dense)} left "
               "dense" + (f"; fit error mean {sum(errs) / len(errs):.3f}, max {max(errs):.3f}"
                          if errs else ""))
    return "\n".join(out)


def save(path: str | Path, model: nn.Module, report: Report, source: model_source.Source,
         input_shape: tuple[int, ...]) -> Path:
    """Write the compressed net (state dict + the spec and source that rebuild it) atomically;
    the file reads with ``torch.load(weights_only=True)``."""
    content = {"format": FORMAT, "source": source.as_dict(), "spec": report.spec,
               "input_shape": list(input_shape), "state_dict": model.state_dict(),
               "report": [asdict(r) for r in report.rows]}
    return atomic_write(path, lambda tmp: torch.save(content, tmp))


def load(path: str | Path) -> nn.Module:
    """Rebuild the net :func:`save` wrote and load its weights (train mode, on the CPU)."""
    content = read(path)
    with torch.random.fork_rng(devices=[]):  # fresh layers draw random numbers (CPU)
        model = model_source.rebuild(model_source.Source(**content["source"]))
        apply_surgery(model, content["spec"], tuple(content["input_shape"]))
    model_source.load_weights(model, content["state_dict"], str(path))
    return model


def read(path: str | Path) -> dict[str, Any]:
    """The raw content of a compressed-net file (one-line error if it is not one)."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as err:
        raise model_source.SourceError(f"{path}: cannot read it ({str(err).splitlines()[0]})"
                                       ) from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise model_source.SourceError(f"{path} is not a kron-compress file (format {FORMAT})")
    return content


# ----------------------------------------------------------------------------- command line
def _kwargs(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq:
            raise ValueError(f"--model-arg {pair!r}: write KEY=VALUE, e.g. num_classes=10")
        out[key] = yaml.safe_load(value)
    return out


def spec_from_args(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The surgery spec of the command line: a layers YAML, or ``*`` at the budget."""
    budget = {k: v for k, v in (("param_ratio", args.param_ratio),
                                ("mac_ratio", args.mac_ratio)) if v is not None}
    if (args.layers is None) == (not budget):
        raise ValueError("give a budget (--param-ratio and/or --mac-ratio) or --layers YAML, "
                         "not both")
    if args.layers is None:
        return {"*": {"kind": args.kind, "init": args.init, **budget}}
    spec = yaml.safe_load(Path(args.layers).read_text())
    if not isinstance(spec, dict):
        raise ValueError(f"--layers {args.layers}: expected a mapping pattern -> entry")
    return {p: {"init": args.init, **(e or {})} for p, e in spec.items()}


def _input_shape(size: str | None, default: tuple[int, ...]) -> tuple[int, int, int, int]:
    if size is None:
        return tuple(default)
    h, _, w = size.lower().partition("x")
    return (1, default[1], int(h), int(w or h))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kron-compress", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="torchvision model name, package.module:callable, or a kron "
                   "run folder")
    p.add_argument("--weights", metavar="PATH", help="state dict (or checkpoint) to load first")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="constructor argument (repeatable), e.g. num_classes=10")
    p.add_argument("--param-ratio", type=float, help="weight parameters per layer / dense")
    p.add_argument("--mac-ratio", type=float, help="MACs per layer / dense")
    p.add_argument("--kind", default="kron", choices=[k for k in layer_kinds() if k != "dense"])
    p.add_argument("--layers", metavar="YAML", help="a surgery spec instead of a budget")
    p.add_argument("--init", default="fit", choices=INITS,
                   help="fit: the best approximation of the trained weights (closed form, "
                   "refined for mixed Kronecker shapes); dense: the closed form only; scratch: "
                   "fresh init")
    p.add_argument("--input-size", metavar="N|HxW", help="input size (default: 224 for "
                   "torchvision, image_size if given, the run's size for run folders)")
    p.add_argument("--out", metavar="PATH", help="output file (default ./NAME-compressed.pt)")
    p.add_argument("--onnx", nargs="?", const="", metavar="PATH",
                   help="also export to ONNX and check it in ONNX Runtime (default: OUT.onnx)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from kron.calibrate import load_default

    load_default("cpu")  # this machine's measured cost-model constants, if calibrated
    try:
        spec = spec_from_args(args)
        built = model_source.build(args.source, _kwargs(args.model_arg))
        if args.weights:
            model_source.load_weights(built.model, model_source.read_state_dict(args.weights),
                                      args.weights)
        shape = _input_shape(args.input_size, built.input_shape)
        report = compress(built.model, spec, shape)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    stem = Path(built.source.name).name.replace(":", "_").replace(".", "_")
    out = Path(args.out or f"{stem}-compressed.pt")
    save(out, built.model, report, built.source, shape)
    print(f"wrote {out}")
    if args.onnx is None:
        return 0
    from kron.export import ExportError, export_onnx

    try:
        result = export_onnx(built.model, shape, args.onnx or out.with_suffix(".onnx"))
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
