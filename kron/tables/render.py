"""Render a table's results as Markdown, CSV and LaTeX (rows in the declared order).

Ratios (parameter and MAC reduction, speedup) are each run's own, against its dense twin built
and timed in the same process by ``kron.train``; the error change is against the table's
reference row. Rows without results stay in the table, marked, with empty numbers.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from typing import Any

from kron.tables.results import RunResult
from kron.tables.spec import PAPER_HEADLINE, Table

DASH = "–"
CSV_FIELDS = ("id", "label", "family", "status", "test_acc1", "test_err1", "delta_err",
              "params", "params_dense", "param_reduction", "macs", "macs_dense", "mac_reduction",
              "macs_executed",
              "speedup", "latency_ms", "latency_dense_ms", "epochs_done", "paper", "run_dir")
COLUMNS = ("Row", "Family", "Top-1 (%)", "Error (%)", "Δ error", "Params", "Param. red.",
           "MACs", "MAC red.", "Speedup (measured)", "Paper", "Status")


def human(n: float | None) -> str:
    """A count as 888.1K / 7.43M / 1.20G."""
    if n is None:
        return DASH
    for div, unit, digits in ((1e9, "G", 2), (1e6, "M", 2), (1e3, "K", 1)):
        if abs(n) >= div:
            return f"{n / div:.{digits}f}{unit}"
    return str(int(n))


def ratio(r: float | None) -> str:
    """A ratio as 3.31x (one decimal from 10x up)."""
    if r is None:
        return DASH
    return f"{r:.1f}x" if r >= 10 else f"{r:.2f}x"


def paper_cell(paper: dict[str, Any]) -> str:
    """What the paper states for a row, or "not stated"."""
    if not paper:
        return "not stated"
    parts = {"acc1": lambda v: f"top-1 {v}%", "error": lambda v: f"error {v}%",
             "params": lambda v: f"{human(v)} params",
             "param_reduction": lambda v: f"{v}x fewer params",
             "speedup": lambda v: f"{v}x speedup"}
    return ", ".join(parts[k](paper[k]) for k in parts if k in paper)


def _div(d: dict[str, Any], a: str, b: str) -> float | None:
    x, y = d.get(a), d.get(b)
    return None if x is None or y in (None, 0) else float(x) / float(y)


def factored_macs(d: dict[str, Any]) -> int | None:
    """MACs per image of the factored net: the dense twin's minus what the surgery saved.

    The surgery rows hold each swapped layer's analytic count of its factored execution;
    ``macs`` in results.json is what ran, and ``implementation=auto`` may run a layer composed
    (as one dense op) when that is faster, which hides the reduction.
    """
    rows, dense = d.get("surgery"), d.get("macs_dense")
    if not rows or dense is None:
        return d.get("macs")
    return int(dense) - sum(int(r["macs_before"]) - int(r["macs_after"]) for r in rows)


def metrics(results: Sequence[RunResult], reference: str | None) -> list[dict[str, Any]]:
    """One dict per row with the raw and derived numbers (None where unknown)."""
    ref = next((r for r in results if r.row.id == reference and r.ok), None)
    ref_err = None if ref is None else 100.0 - float(ref.data["test_acc1"])
    out = []
    for r in results:
        d = r.data if r.ok else {}
        d = {**d, "macs_executed": d.get("macs"), "macs": factored_macs(d)} if d else d
        acc = d.get("test_acc1")
        err = None if acc is None else 100.0 - float(acc)


        out.append({
            "id": r.row.id, "label": r.row.label, "family": r.row.family, "status": r.status,
            "reason": r.reason, "test_acc1": acc, "test_err1": err,
            "delta_err": None if err is None or ref_err is None else err - ref_err,
            "is_reference": r.row.id == reference,
            "params": d.get("params"), "params_dense": d.get("params_dense"),
            "param_reduction": _div(d, "params_dense", "params"),
            "macs": d.get("macs"), "macs_dense": d.get("macs_dense"),
            "mac_reduction": _div(d, "macs_dense", "macs"), "macs_executed": d.get("macs_executed"),
            "speedup": d.get("speedup"),
            "latency_ms": d.get("latency_ms"), "latency_dense_ms": d.get("latency_dense_ms"),
            "epochs_done": d.get("epochs_done"), "paper": paper_cell(r.row.paper),
            "run_dir": r.path,
        })
    return out


def _cells(m: dict[str, Any], mark: Callable[[str], str]) -> list[str]:
    num = (lambda v: DASH if v is None else f"{v:.2f}")  # noqa: E731
    if m["is_reference"] and m["delta_err"] is not None:
        delta = "ref"
    else:
        delta = DASH if m["delta_err"] is None else f"{m['delta_err']:+.2f}"
    status = m["status"] if m["status"] == "ok" else mark(m["status"])
    if m["status"] == "incomplete":
        status += f" ({m['reason']})"
    speed = None if m["speedup"] is None else ratio(m["speedup"])
    return [m["label"], m["family"], num(m["test_acc1"]), num(m["test_err1"]), delta,
            human(m["params"]), ratio(m["param_reduction"]), human(m["macs"]),
            ratio(m["mac_reduction"]), speed or DASH, m["paper"], status]


def headline_lines(rows: list[dict[str, Any]], table: Table) -> list[str]:
    """The abstract's headline beside ours: best speedup / parameter reduction < 1 point worse."""
    lines = [f"Paper's headline: {PAPER_HEADLINE}."]
    if not any(m["is_reference"] and m["test_err1"] is not None for m in rows):
        lines.append("Ours: no result for the reference row yet, so no accuracy drop to compare.")
        return lines
    close = [m for m in rows if not m["is_reference"] and m["delta_err"] is not None
             and m["delta_err"] < 1.0]
    if not close:
        lines.append("Ours: no row is within 1 point of the reference error.")
        return lines

    def best(key: str) -> str:
        have = [m for m in close if m[key] is not None]
        if not have:
            return DASH
        top = max(have, key=lambda m: m[key])
        return f"{ratio(top[key])} ({top['label']})"

    lines.append(f"Ours, among rows less than 1 point worse than {table.reference}: best measured "
                 f"speedup {best('speedup')}, best parameter reduction {best('param_reduction')}.")
    return lines


def to_markdown(table: Table, results: Sequence[RunResult]) -> str:
    """The table as GitHub Markdown with its notes (deterministic: no dates, no absolute paths)."""
    rows = metrics(results, table.reference)
    out = [f"## {table.title}", ""]
    if table.paper:
        out += [f"Paper: {table.paper}.", ""]
    out.append("| " + " | ".join(COLUMNS) + " |")
    out.append("|" + "|".join([":--", ":--"] + ["--:"] * 8 + [":--", ":--"]) + "|")
    for m in rows:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in
                                     _cells(m, lambda s: f"**{s}**")) + " |")
    out += ["", "Param./MAC reduction and speedup are against each run's own dense twin (same "
            "net, no layer swapped), speedup measured in the same process; MACs are per image, "
            "of the factored layers (table.csv's macs_executed: what ran); Δ error is in points "
            f"against the reference row ({table.reference or 'none'})."]
    if table.headline:
        out += [""] + [f"- {line}" for line in headline_lines(rows, table)]
    bad = [m for m in rows if m["status"] not in ("ok",)]
    if bad:
        out += ["", "Not complete: " + "; ".join(
            f"{m['id']} ({m['status']}: {m['reason']})" for m in bad) + "."]
    if table.reconstruction:
        out += ["", "Reconstruction choices:", ""] + [f"- {s}" for s in table.reconstruction]
    if table.notes:
        out += ["", "Notes:", ""] + [f"- {s}" for s in table.notes]
    return "\n".join(out) + "\n"


def _csv_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(round(v, 4))
    return str(v)


def to_csv(table: Table, results: Sequence[RunResult], base: Any = None) -> str:
    """One line per row, raw numbers (floats rounded to 4 decimals); empty cells where unknown.

    ``run_dir`` is written relative to ``base`` when given (stable across machines).
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for m in metrics(results, table.reference):
        path = m["run_dir"]
        if path is not None and base is not None:
            try:
                path = path.relative_to(base)
            except ValueError:
                pass
        m = {**m, "run_dir": "" if path is None else path.as_posix()}
        w.writerow([_csv_value(m[k]) for k in CSV_FIELDS])
    return buf.getvalue()


def tex_escape(s: str) -> str:
    """Escape LaTeX's special characters in plain text."""
    rep = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
           "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
           "^": r"\textasciicircum{}", "–": "--", "Δ": r"$\Delta$"}
    return "".join(rep.get(c, c) for c in s)


def to_latex(table: Table, results: Sequence[RunResult]) -> str:
    """A booktabs ``table`` environment; missing/failed rows are marked in italics."""
    rows = metrics(results, table.reference)
    lines = [f"% generated by kron-tables render {table.name}; do not edit",
             r"\begin{table}[t]", r"\centering", r"\small",
             rf"\caption{{{tex_escape(table.title)}}}", rf"\label{{tab:kron-{table.name}}}",
             r"\begin{tabular}{ll" + "r" * 8 + "ll}", r"\toprule",
             " & ".join(tex_escape(c) for c in COLUMNS) + r" \\", r"\midrule"]
    for m in rows:
        cells = [tex_escape(c) for c in _cells(m, lambda s: s)]
        cells = [c[:-1] + r"$\times$" if c.endswith("x") and c[:-1].replace(".", "").isdigit()
                 else c for c in cells]
        if m["status"] != "ok":
            cells[-1] = rf"\textit{{{cells[-1]}}}"
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"
