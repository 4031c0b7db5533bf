"""ONNX export that is checked before it is reported: ``kron-export RUN_DIR`` (or a file
written by ``kron-compress``) and ``kron-compress --onnx``.

The net is traced once at batch 1 (``torch.onnx.export(..., dynamo=True)``) with a dynamic
batch dimension, and dynamic height and width when the eager net itself runs at another size
(nets ending in Flatten + Linear do not), then run in ONNX Runtime at batch 1 and 7 (and at
the other size) and compared with the eager net. Success is reported only if every output
matches within :func:`tolerance`; a dynamic-size graph that fails its check is replaced by a
batch-only one, checked the same way. The trace treats size-1 dimensions as general sizes
(``backed_size_oblivious``): torch.export otherwise turns a batch of 1 into the constant 1.

The tolerance. ONNX Runtime and PyTorch compute the same float32 sums in different orders,
so they differ by rounding alone. A length-``K`` dot product rounds each partial sum, to
``u = 2^-24`` relative; with errors of either sign the accumulated error grows like
``sqrt(K) u`` times the size of the terms. Layers that keep activations at a similar scale
(normalisation) pass an incoming relative error through about unchanged, so the errors of the
layers add: ``err / max|y| <~ u * sum_l sqrt(K_l)`` over the net's Linear/Conv layers with
fan-in ``K_l``. :func:`tolerance` allows ``SAFETY = 8`` times that (same-sign runs, error
amplification by weights larger than 1), relative to the largest eager output. For ResNet-18
it is 3e-4; the measured differences are ~1e-6. A layer that computed something else, a
batch fixed at trace time, or a wrong shape is off by O(1). See docs/design.md, D2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kron.fileio import atomic_path

UNIT_ROUNDOFF = 2.0**-24  # float32
SAFETY = 8.0
DEPLOY_HINT = "pip install 'kron[deploy]' (onnx, onnxruntime, onnxscript)"
SPATIAL_PROBE = 32  # the other size tried: +32 pixels keeps every stride up to 32 whole


class ExportError(RuntimeError):
    """Export or its check failed (one line naming the problem)."""


@dataclass
class Check:
    """One ONNX Runtime run against eager: the input shape, the largest absolute difference,
    the allowed one, or the error that stopped it."""

    shape: tuple[int, ...]
    max_diff: float | None
    bound: float | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.max_diff is not None and self.max_diff <= self.bound


@dataclass
class ExportResult:
    path: Path
    dynamic: list[str]
    checks: list[Check] = field(default_factory=list)

    def summary(self) -> str:
        runs = ", ".join(f"{'x'.join(map(str, c.shape))} (diff {c.max_diff:.1e} <= "
                         f"{c.bound:.1e})" for c in self.checks)
        return (f"wrote {self.path} (dynamic: {', '.join(self.dynamic) or 'none'}); ONNX Runtime "
                f"matches eager at {runs}")


def require_onnxruntime():
    """The ``onnxruntime`` module, or a one-line :class:`ExportError` naming the extra."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ExportError(f"ONNX export needs {err.name}: {DEPLOY_HINT}") from None
    return onnxruntime


def fan_ins(model: nn.Module) -> list[int]:
    """Accumulation length of every Linear/Conv-like layer (dense or factored): in_features,
    or in_channels / groups * kernel area."""
    out = []
    for m in model.modules():
        if isinstance(getattr(m, "in_features", None), int):
            out.append(m.in_features)
        elif isinstance(getattr(m, "in_channels", None), int) and hasattr(m, "kernel_size"):
            groups = m.groups if isinstance(m, nn.Conv2d) else 1
            out.append(m.in_channels // groups * math.prod(m.kernel_size))
    return out


def tolerance(model: nn.Module) -> float:
    """Allowed ``|ORT - eager| / max|eager|`` in float32 (module docstring)."""
    return SAFETY * UNIT_ROUNDOFF * (1 + sum(math.sqrt(k) for k in fan_ins(model)))


def _eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def spatial_ok(model: nn.Module, input_shape: tuple[int, ...]) -> bool:
    """Whether the eager net runs at ``SPATIAL_PROBE`` more pixels each way."""
    n, c, h, w = input_shape
    try:
        _eager(model, torch.zeros(1, c, h + SPATIAL_PROBE, w + SPATIAL_PROBE))
    except (RuntimeError, ValueError, AssertionError):
        return False
    return True


def _size_oblivious() -> contextlib.AbstractContextManager:
    """Trace a size-1 dimension as a general size: without it, torch.export specialises the
    batch of an example at batch 1 to the constant 1 (its 0/1 rule), and every reshape that
    names the batch (a factored layer's rows) is baked in for batch 1 only."""
    import torch.fx.experimental._config as fx_config

    if hasattr(fx_config, "backed_size_oblivious"):
        return fx_config.patch(backed_size_oblivious=True)
    return contextlib.nullcontext()


def _trace(model: nn.Module, x: torch.Tensor, dims: dict[int, object]):
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf), \
            contextlib.redirect_stderr(buf), _size_oblivious():
        warnings.simplefilter("ignore")
        return torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=(dims,),
                                 verbose=False)


def trace(model: nn.Module, input_shape: tuple[int, ...], dynamic_hw: bool = True):
    """The ONNX program of ``model`` traced at batch 1, and the names of its dynamic axes
    (batch, height and width when the net allows and ``dynamic_hw``, else batch)."""
    return next(iter(traces(model, input_shape, dynamic_hw)))


def traces(model: nn.Module, input_shape: tuple[int, ...], dynamic_hw: bool = True):
    """``(program, axis names)`` for each way to trace ``model`` at batch 1, most dynamic
    first (batch, height and width; then batch only); raises :class:`ExportError` if none
    traces."""
    from torch.export import Dim

    x = torch.randn(1, *input_shape[1:])
    names = {0: "batch", 2: "height", 3: "width"}
    tries = [(0, 2, 3), (0,)] if dynamic_hw and spatial_ok(model, input_shape) else [(0,)]
    last, traced = None, False
    for axes in tries:
        try:
            program = _trace(model, x, {a: Dim.DYNAMIC for a in axes})
        except Exception as err:  # noqa: BLE001 - the exporter raises many types
            last = err
            continue
        traced = True
        yield program, [names[a] for a in axes]
    if not traced:
        raise ExportError(f"torch.onnx.export failed: {type(last).__name__}: {_one_line(last)}")


def check(session, model: nn.Module, shapes: list[tuple[int, ...]], rel_tol: float,
          seed: int = 0) -> list[Check]:
    """Run the ONNX Runtime ``session`` and the eager ``model`` on random inputs of each shape."""
    (name,) = [i.name for i in session.get_inputs()]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        x = torch.randn(shape, generator=gen)
        want = _eager(model, x)
        try:
            (got,) = session.run(None, {name: x.numpy()})
        except Exception as err:  # noqa: BLE001 - onnxruntime's own exception types
            out.append(Check(tuple(shape), None, None, _one_line(err)))
            continue
        bound = rel_tol * float(want.abs().max())
        if tuple(got.shape) != tuple(want.shape):
            out.append(Check(tuple(shape), None, bound, f"output shape {tuple(got.shape)}, "
                             f"eager {tuple(want.shape)}"))
            continue
        out.append(Check(tuple(shape), float((torch.from_numpy(got) - want).abs().max()), bound))
    return out


def _one_line(err: Exception, limit: int = 300) -> str:
    """An exception as one line of at most about ``limit`` characters (head and tail)."""
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return line if len(line) <= limit else f"{line[:100]} ... {line[-(limit - 100):]}"


def session_for(path: str | Path):
    """An ONNX Runtime CPU session on ``path`` with PyTorch's thread count."""
    ort = require_onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.log_severity_level = 4  # fatal only: `check` reports failed runs itself, in one line
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | Path,
                batches: tuple[int, ...] = (1, 7), dynamic_hw: bool = True) -> ExportResult:
    """Export ``model`` (on the CPU, float32, eval mode) to ``path`` traced at batch 1, then
    check it in ONNX Runtime at ``batches`` (and at another height and width when those are
    dynamic); raises :class:`ExportError` (and leaves no file) unless every check passes."""
    require_onnxruntime()
    was_training = model.training
    model.eval()
    failure = None
    try:
        for program, dynamic in traces(model, tuple(input_shape), dynamic_hw):
            try:
                checks = _save_checked(program, dynamic, model, input_shape, batches, path)
            except ExportError as err:  # the file is gone; a less dynamic trace may pass
                failure = failure or err
                continue
            return ExportResult(Path(path), dynamic, checks)
    finally:
        model.train(was_training)
    raise failure


def _save_checked(program, dynamic: list[str], model: nn.Module, input_shape, batches,
                  path: str | Path) -> list:
    """Save ``program`` at ``path`` if ONNX Runtime matches eager at every checked size, else
    raise :class:`ExportError` naming the first size that fails (and leave no file)."""
    with atomic_path(path) as tmp:  # renamed onto `path` only if every check passes
        program.save(str(tmp))
        shapes = [(b, *input_shape[1:]) for b in batches]
        if "height" in dynamic:
            n, c, h, w = input_shape
            shapes.append((2, c, h + SPATIAL_PROBE, w + SPATIAL_PROBE))
        checks = check(session_for(tmp), model, shapes, tolerance(model))
        bad = [c for c in checks if not c.ok]
        if bad:
            c = bad[0]
            why = c.error or f"max |ORT - eager| {c.max_diff:.2e} > {c.bound:.2e}"
            raise ExportError(f"ONNX Runtime at input {'x'.join(map(str, c.shape))}: {why}")
    return checks



def load_for_export(target: str | Path) -> tuple[nn.Module, tuple[int, ...], Path]:
    """The net, input shape and default ONNX path of a run folder or a kron-compress file."""
    from kron import compress, model_source

    target = Path(target)
    if target.is_dir():
        built = model_source.build(str(target))
        return built.model, built.input_shape, target / "model.onnx"
    if target.is_file():
        shape = tuple(compress.read(target)["input_shape"])
        return compress.load(target), shape, target.with_suffix(".onnx")
    raise model_source.SourceError(f"{target}: no such run folder or kron-compress file")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kron-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="a kron run folder (checkpoint + config) or a file written by "
                   "kron-compress")
    p.add_argument("--out", metavar="PATH", help="default: RUN_DIR/model.onnx or FILE.onnx")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 7],
                   help="batch sizes checked in ONNX Runtime (default 1 7)")
    p.add_argument("--static-hw", action="store_true", help="keep height and width fixed")
    args = p.parse_args(argv)
    from kron.calibrate import load_default

    load_default("cpu")  # this machine's measured cost-model constants, if calibrated
    try:
        require_onnxruntime()
        model, shape, default = load_for_export(args.target)
        result = export_onnx(model, shape, args.out or default, tuple(args.batches),
                             dynamic_hw=not args.static_hw)
    except (ExportError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
