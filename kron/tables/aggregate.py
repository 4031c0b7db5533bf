"""Seeds into table cells: mean and sample standard deviation per row, Δ error per seed pair.

A table row runs with seeds ``0..N-1`` (results.json stays one run); everything that combines
runs lives here (docs/design.md, D9). For values ``x_1..x_n`` a cell shows the mean and the
sample standard deviation ``s = sqrt(sum (x_i - mean)^2 / (n - 1))`` (none for n = 1), with n.
The error change against the reference row is taken per seed pair, ``d_k = err(row, k) -
err(ref, k)`` over the seeds k both finished, and summarised the same way: it is the spread of
the differences, not of either row alone. Only complete (``ok``) runs enter the numbers.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kron.tables.results import RunResult, by_row

#: what a row can show: every seed finished, some did, or the most advanced state of any
ROW_STATUSES = ("ok", "partial", "incomplete", "failed", "missing")
#: numbers of results.json (or derived) summarised across seeds
KEYS = ("test_acc1", "test_err1", "params", "params_dense", "param_reduction", "macs_analytic",
        "macs_dense", "mac_reduction", "macs_executed", "speedup", "throughput_speedup",
        "latency_ms", "latency_dense_ms", "epochs_done")


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (None for one value) and count of some numbers."""

    mean: float
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat | None:
        vals = [float(v) for v in values if v is not None]
        if not vals:
            return None
        mean = statistics.fmean(vals)
        if len(vals) == 1:
            return cls(mean, None, 1)
        return cls(mean, statistics.stdev(vals), len(vals))  # the sample std (n - 1)

    @property
    def spread(self) -> float:
        """The standard deviation, 0 when there is only one value."""
        return self.std or 0.0

    @property
    def low(self) -> float:
        return self.mean - self.spread

    @property
    def high(self) -> float:
        return self.mean + self.spread


def separated(a: Stat | None, b: Stat | None) -> bool:
    """True when the intervals mean ± std of ``a`` and ``b`` do not overlap, both from at least
    two values (one run has no spread, so it separates from nothing)."""
    if a is None or b is None or a.n < 2 or b.n < 2:
        return False
    return a.high < b.low or b.high < a.low


def _div(d: dict[str, Any], a: str, b: str) -> float | None:
    x, y = d.get(a), d.get(b)
    return None if x is None or y in (None, 0) else float(x) / float(y)


def run_numbers(data: dict[str, Any]) -> dict[str, Any]:
    """One run's numbers, with the derived ones: error and reductions. The MAC reduction is
    of ``macs_analytic``, the factored layers' formula count (``implementation=auto`` may run
    a layer composed, which hides the reduction; ``macs_executed`` is what ran, counted by
    FlopCounterMode); a record without an analytic count uses its executed one."""
    d = {k: data.get(k) for k in KEYS}
    if d["macs_analytic"] is None:
        d["macs_analytic"] = d["macs_executed"]
    acc = data.get("test_acc1")
    d["test_err1"] = None if acc is None else 100.0 - float(acc)
    d["param_reduction"] = _div(d, "params_dense", "params")
    d["mac_reduction"] = _div(d, "macs_dense", "macs_analytic")
    return d


def row_status(runs: Sequence[RunResult], asked: int) -> tuple[str, str]:
    """A row's status and its reason from its seeds' runs.

    ``ok``: every asked seed finished. ``partial``: some did (the reason counts them and says
    what the others are). Otherwise the most advanced state of any seed: ``incomplete`` (a
    run stopped early), ``failed``, ``missing``.
    """
    ok = [r for r in runs if r.ok]
    others = [r for r in runs if not r.ok]
    detail = "; ".join(f"seed {r.seed} {r.status}: {r.reason}" for r in others)
    if len(ok) == asked:
        return "ok", ""
    if ok:
        return "partial", f"{len(ok)}/{asked} seeds" + (f" ({detail})" if detail else "")
    for status in ROW_STATUSES[2:]:  # incomplete, failed, missing: the most advanced first
        if any(r.status == status for r in runs):
            return status, detail if asked > 1 else next(
                r.reason for r in runs if r.status == status)
    return "missing", "no run"


def summarize(results: Sequence[RunResult], reference: str | None,
              asked: int | None = None) -> list[dict[str, Any]]:
    """One dict per row: ``status``, ``reason``, ``n`` (finished seeds), ``asked``, a
    :class:`Stat` (or None) per key of :data:`KEYS` and ``delta_err`` (per seed pair)."""
    groups = by_row(results)
    asked = asked or max((len(v) for v in groups.values()), default=1)
    ref_err = {r.seed: run_numbers(r.data)["test_err1"] for r in groups.get(reference, [])
               if r.ok}
    out = []
    for runs in groups.values():
        row = runs[0].row
        numbers = {r.seed: run_numbers(r.data) for r in runs if r.ok}
        status, reason = row_status(runs, asked)
        m: dict[str, Any] = {
            "id": row.id, "label": row.label, "family": row.family, "budget": row.budget,
            "row": row, "status": status, "reason": reason, "n": len(numbers), "asked": asked,
            "is_reference": row.id == reference, "runs": list(runs),
            "run_dir": next((r.path for r in runs if r.ok), runs[0].path),
        }
        for key in KEYS:
            m[key] = Stat.of([d[key] for d in numbers.values() if d[key] is not None])
        pairs = [numbers[s]["test_err1"] - ref_err[s] for s in numbers if s in ref_err]
        m["delta_err"] = Stat.of(pairs)
        out.append(m)
    return out
