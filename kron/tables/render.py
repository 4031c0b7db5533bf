"""Render a table's results as Markdown, CSV and LaTeX (rows in the declared order).

Every row is summarised over its seeds (kron/tables/aggregate.py): a number is the mean, with
the sample standard deviation after ``±`` when two or more seeds finished, and ``n`` counts
them. Ratios (parameter and MAC reduction, speedup) are each run's own, against its dense twin
built and timed in the same process by ``kron.train``; the error change is against the table's
reference row, per seed pair. Rows without results stay in the table, marked, with empty
numbers. Under a headline table, each claim of the paper's abstract is checked against our rows
with their spread (docs/design.md, D9).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from typing import Any

from kron.tables.aggregate import KEYS, Stat, separated, summarize
from kron.tables.results import RunResult
from kron.tables.settings import settings_line
from kron.tables.spec import PAPER_HEADLINE, Table

DASH = "–"
PM = "±"
CSV_FIELDS = ("id", "label", "family", "status", "n", "asked",
              *(k for key in ("test_acc1", "test_err1", "delta_err") for k in (key, key + "_std")),
              "params", "params_dense", "param_reduction", "macs_analytic", "macs_dense",
              "mac_reduction", "macs_executed", "speedup", "speedup_std", "throughput_speedup",
              "throughput_speedup_std", "latency_ms", "latency_dense_ms",
              "epochs_done", "paper", "run_dir")
RUN_FIELDS = ("id", "seed", "status", "test_acc1", "params", "macs_analytic", "macs_executed",
              "speedup", "latency_batch_size", "throughput_speedup", "throughput_batch_size",
              "latency_ms", "latency_dense_ms", "epochs_done", "reason", "run_dir")
COLUMNS = ("Row", "Family", "n", "Top-1 (%)", "Error (%)", "Δ error", "Params", "Param. red.",
           "MACs", "MAC red.", "Speedup (measured)", "Speedup, large batch", "Paper", "Status")
RATIO_COLUMNS = (7, 9, 10, 11)  # Param. red., MAC red., the two speedups
#: the abstract's claims, each at "less than 1% drop in accuracy" (read as < 1 point of top-1)
CLAIMS = (("speedup", 3.3, "3.3x speedup"),
          ("throughput_speedup", 3.3, "3.3x speedup at the large (throughput) batch"),
          ("param_reduction", 3.6, "3.6x fewer parameters"))
DROP = 1.0


def human(n: float | None) -> str:
    """A count as 888.1K / 7.43M / 1.20G."""
    if n is None:
        return DASH
    for div, unit, digits in ((1e9, "G", 2), (1e6, "M", 2), (1e3, "K", 1)):
        if abs(n) >= div:
            return f"{n / div:.{digits}f}{unit}"
    return str(int(round(n)))


def ratio(r: float | None) -> str:
    """A ratio as 3.31x (one decimal from 10x up)."""
    if r is None:
        return DASH
    return f"{r:.1f}x" if r >= 10 else f"{r:.2f}x"


def num(s: Stat | None, fmt: str = "{:.2f}", sign: bool = False) -> str:
    """``mean ± std`` of a :class:`Stat` (just the mean for one value), or a dash."""
    if s is None:
        return DASH
    mean = (("{:+" + fmt[2:]) if sign else fmt).format(s.mean)
    return mean if s.std is None else f"{mean} {PM} {fmt.format(s.std)}"


def ratio_stat(s: Stat | None) -> str:
    """A ratio with its spread: ``3.31x ± 0.05`` (ratios that do not vary: just ``3.31x``)."""
    if s is None:
        return DASH
    if s.std is None or s.std < 5e-5 * max(1.0, abs(s.mean)):
        return ratio(s.mean)
    return f"{ratio(s.mean)} {PM} {s.std:.2f}"


def paper_cell(paper: dict[str, Any]) -> str:
    """What the paper states for a row, or "not stated"."""
    if not paper:
        return "not stated"
    parts = {"acc1": lambda v: f"top-1 {v}%", "error": lambda v: f"error {v}%",
             "params": lambda v: f"{human(v)} params",
             "param_reduction": lambda v: f"{v}x fewer params",
             "speedup": lambda v: f"{v}x speedup"}
    return ", ".join(parts[k](paper[k]) for k in parts if k in paper)


def metrics(results: Sequence[RunResult], reference: str | None,
            asked: int | None = None) -> list[dict[str, Any]]:
    """One dict per row (:func:`kron.tables.aggregate.summarize`) with its paper cell."""
    rows = summarize(results, reference, asked)
    for m in rows:
        m["paper"] = paper_cell(m["row"].paper)
    return rows


def _status(m: dict[str, Any], mark: Callable[[str], str]) -> str:
    if m["status"] == "ok":
        return "ok"
    text = mark(m["status"] if m["status"] != "partial" else m["reason"].split(" (")[0])
    if m["status"] == "incomplete" and m["asked"] == 1:
        text += f" ({m['reason']})"
    return text


def _cells(m: dict[str, Any], mark: Callable[[str], str]) -> list[str]:
    if m["is_reference"] and m["delta_err"] is not None:
        delta = "ref"
    else:
        delta = num(m["delta_err"], sign=True)
    n = str(m["n"]) if m["n"] == m["asked"] else f"{m['n']}/{m['asked']}"
    mean = (lambda s: None if s is None else s.mean)  # noqa: E731
    return [m["label"], m["family"], n, num(m["test_acc1"]), num(m["test_err1"]), delta,
            human(mean(m["params"])), ratio_stat(m["param_reduction"]),
            human(mean(m["macs_analytic"])), ratio_stat(m["mac_reduction"]),
            ratio_stat(m["speedup"]), ratio_stat(m["throughput_speedup"]), m["paper"],
            _status(m, mark)]


def _claim_row(m: dict[str, Any], key: str, target: float) -> str:
    """Verdict of one row on one claim: met, one-seed, overlaps, or not."""
    d, v = m["delta_err"], m[key]
    if d is None or v is None:
        return "not"
    if d.mean >= DROP or v.mean < target:
        return "not"
    if d.n < 2:
        return "one-seed"
    return "met" if d.high < DROP and v.low >= target else "overlaps"


def _describe(m: dict[str, Any], key: str) -> str:
    return (f"{m['label']} (Δ error {num(m['delta_err'], sign=True)} points, "
            f"{ratio_stat(m[key])}, n={m['n']})")


def claim_lines(rows: list[dict[str, Any]], table: Table) -> list[str]:
    """Per claim of the abstract: met by which row, or why not (the seed spread counts)."""
    ref = next((m for m in rows if m["is_reference"]), None)
    if ref is None or ref["test_err1"] is None:
        return ["Ours: no result for the reference row yet, so no accuracy drop to compare."]
    lines = []
    for key, target, claim in CLAIMS:
        if all(m[key] is None for m in rows):
            lines.append(f"Claim \"{claim} at < {DROP:g} point drop\": not measured (no run "
                         "recorded it).")
            continue
        verdicts = [(m, _claim_row(m, key, target)) for m in rows if not m["is_reference"]]
        by = {v: sorted((m for m, w in verdicts if w == v), key=lambda m: -m[key].mean)
              for v in ("met", "overlaps", "one-seed")}
        if by["met"]:
            text = (f"**met** by {_describe(by['met'][0], key)}: Δ error + its std stays under "
                    f"{DROP:g} point and the ratio - its std reaches {target}x")
        elif by["overlaps"]:
            text = (f"**not established**: {_describe(by['overlaps'][0], key)} reaches it on "
                    f"average, but its seed spread overlaps the {DROP:g}-point line or the "
                    f"{target}x line")
        elif by["one-seed"]:
            text = (f"**not established**: {_describe(by['one-seed'][0], key)} reaches it on "
                    "one seed, which has no spread (run with --seeds 3)")
        else:
            close = [m for m in rows if not m["is_reference"] and m["delta_err"] is not None
                     and m["delta_err"].mean < DROP and m[key] is not None]
            best = max(close, key=lambda m: m[key].mean, default=None)
            text = "**not met**: " + (
                f"the best row less than {DROP:g} point worse is {_describe(best, key)}"
                if best else f"no row is less than {DROP:g} point worse than "
                             f"{table.reference}")
        lines.append(f"Claim \"{claim} at < {DROP:g} point drop\": {text}.")
    return lines


def separation_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Whether any two families differ in error by more than their seeds' spread (each
    family by its best row, the lowest mean error)."""
    best: dict[str, dict[str, Any]] = {}
    for m in rows:
        e = m["test_err1"]
        if e is not None and (m["family"] not in best
                              or e.mean < best[m["family"]]["test_err1"].mean):
            best[m["family"]] = m
    if len(best) < 2:
        return []
    fams = list(best)
    shown = ", ".join(f"{f} {num(best[f]['test_err1'])} ({best[f]['label']})" for f in fams)
    if any(best[f]["test_err1"].n < 2 for f in fams):
        return [f"Families, best row each (error %): {shown}. One seed has no spread, so no "
                "difference between families can be called real (run with --seeds 3)."]
    pairs = [(a, b) for i, a in enumerate(fams) for b in fams[i + 1:]
             if separated(best[a]["test_err1"], best[b]["test_err1"])]
    if not pairs:
        return [f"Families, best row each (error %): {shown}. On this data no two families "
                "differ by more than their seeds' spread."]
    return [f"Families, best row each (error %): {shown}. Separated by more than their "
            "seeds' spread (mean ± std intervals apart): "
            + ", ".join(f"{a} vs {b}" for a, b in pairs) + "."]


def vs_reference(m: dict[str, Any]) -> str | None:
    """Whether a row's error differs from the reference row's by more than its spread:
    ``separated`` when the interval mean ± std of its per-seed-pair Δ error excludes 0,
    ``not separated`` when it contains 0, ``one seed`` without a spread; None for the reference
    row itself and rows without a Δ error."""
    d = m["delta_err"]
    if m["is_reference"] or d is None:
        return None
    if d.n < 2:
        return "one seed"
    return "separated" if d.low > 0 or d.high < 0 else "not separated"


def reference_line(rows: list[dict[str, Any]], reference: str | None) -> str | None:
    """One sentence, under the title, on which rows differ from the reference by more than
    their seed spread and which do not (a difference inside the spread is not a result)."""
    by: dict[str, list[str]] = {"separated": [], "not separated": [], "one seed": []}
    for m in rows:
        verdict = vs_reference(m)
        if verdict is not None:
            by[verdict].append(f"{m['label']} ({num(m['delta_err'], sign=True)})")
    if not any(by.values()):
        return None
    parts = [f"**No row is separated from {reference}.**"] if not by["separated"] else [
        f"Separated from {reference} (Δ error points, outside its seed spread): "
        + ", ".join(by["separated"]) + "."]
    if by["not separated"]:
        parts.append("**Not separated** (Δ error inside its seed spread): "
                     + ", ".join(by["not separated"]) + ".")
    if by["one seed"]:
        parts.append("**Not separated** (one seed, no spread): " + ", ".join(by["one seed"])
                     + ".")
    return " ".join(parts)


def _batch_sizes(rows: list[dict[str, Any]]) -> str:
    """The batch sizes the two speedup columns were timed at, from the runs' records."""
    def sizes(key: str) -> str:
        found = sorted({int(r.data[key]) for m in rows for r in m["runs"]
                        if r.ok and r.data.get(key)})
        return "/".join(map(str, found)) or DASH
    return (f" (speedup at batch {sizes('latency_batch_size')}, large batch "
            f"{sizes('throughput_batch_size')})")


def to_markdown(table: Table, results: Sequence[RunResult], asked: int | None = None) -> str:
    """The table as GitHub Markdown with its notes (deterministic: no dates, no absolute paths).
    Under the title, which rows differ from the reference by more than their seed spread."""
    rows = metrics(results, table.reference, asked)
    out = [f"## {table.title}", ""]
    against = reference_line(rows, table.reference)
    if against:
        out += [against, ""]
    if table.paper:
        out += [f"Paper: {table.paper}.", ""]
    ran = settings_line(results)
    if ran:
        out += [ran, ""]
    out.append("| " + " | ".join(COLUMNS) + " |")
    out.append("|" + "|".join([":--", ":--"] + ["--:"] * 10 + [":--", ":--"]) + "|")
    for m in rows:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in
                                     _cells(m, lambda s: f"**{s}**")) + " |")
    seeds = rows[0]["asked"] if rows else 1
    out += ["", f"Each number is the mean over the n finished seeds (of {seeds} asked)"
            + (", ± the sample standard deviation" if seeds > 1 else "")
            + "; Δ error is in points against the reference row "
            f"({table.reference or 'none'}), taken per seed pair. Param./MAC reduction and "
            "speedup are against each run's own dense twin (same net, no layer swapped), "
            "speedup measured in the same process" + _batch_sizes(rows)
            + "; MACs are per image, counted analytically from the factored layers "
            "(table.csv's macs_analytic; macs_executed: what ran)."]
    extra = separation_lines(rows)
    if table.headline:
        extra = [f"Paper's headline: {PAPER_HEADLINE}.", *claim_lines(rows, table), *extra]
    if extra:
        out += [""] + [f"- {line}" for line in extra]
    bad = [m for m in rows if m["status"] != "ok"]
    if bad:
        out += ["", "Not complete: " + "; ".join(
            f"{m['id']} ({m['status']}: {m['reason']})" for m in bad) + "."]
    if table.reconstruction:
        out += ["", "Reconstruction choices of the declared table" + (
            " (for its full-size data and schedule; where they differ from the Ran line above, "
            "these numbers come from the Ran line's setting):" if ran else ":"), ""]
        out += [f"- {s}" for s in table.reconstruction]
    if table.notes:
        out += ["", "Notes:", ""] + [f"- {s}" for s in table.notes]
    return "\n".join(out) + "\n"


def _csv_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):  # 4 decimals; whole numbers (means of counts) as integers
        return str(int(v)) if v.is_integer() else repr(round(v, 4))
    return str(v)


def _rel(path: Any, base: Any) -> str:
    if path is None:
        return ""
    if base is not None:
        try:
            path = path.relative_to(base)
        except ValueError:
            pass
    return path.as_posix()


def to_csv(table: Table, results: Sequence[RunResult], base: Any = None,
           asked: int | None = None) -> str:
    """One line per row: means, the std of the varying ones (``*_std``), n; floats rounded to
    4 decimals; empty cells where unknown. ``run_dir`` (a finished seed's) is relative to
    ``base`` when given (stable across machines)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for m in metrics(results, table.reference, asked):
        flat: dict[str, Any] = {k: m[k] for k in ("id", "label", "family", "status", "n",
                                                  "asked", "paper")}
        for key in (*KEYS, "delta_err"):
            s = m[key]
            flat[key] = None if s is None else s.mean
            flat[key + "_std"] = None if s is None else s.std
        flat["run_dir"] = _rel(m["run_dir"], base)
        w.writerow([_csv_value(flat[k]) for k in CSV_FIELDS])
    return buf.getvalue()


def runs_csv(results: Sequence[RunResult], base: Any = None) -> str:
    """One line per run (row and seed), the raw numbers of its results.json."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(RUN_FIELDS)
    for r in results:
        d = {**r.data, "id": r.row.id, "seed": r.seed, "status": r.status, "reason": r.reason,
             "run_dir": _rel(r.path, base)}
        w.writerow([_csv_value(d.get(k)) for k in RUN_FIELDS])
    return buf.getvalue()


def tex_escape(s: str) -> str:
    """Escape LaTeX's special characters in plain text."""
    rep = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
           "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
           "^": r"\textasciicircum{}", "–": "--", "Δ": r"$\Delta$", PM: r"$\pm$"}
    return "".join(rep.get(c, c) for c in s)


def to_latex(table: Table, results: Sequence[RunResult], asked: int | None = None) -> str:
    """A booktabs ``table`` environment; rows that are not ok are marked in italics."""
    rows = metrics(results, table.reference, asked)
    lines = [f"% generated by kron-tables render {table.name}; do not edit",
             r"\begin{table}[t]", r"\centering", r"\small",
             rf"\caption{{{tex_escape(table.title)}}}", rf"\label{{tab:kron-{table.name}}}",
             r"\begin{tabular}{ll" + "r" * 10 + "ll}", r"\toprule",
             " & ".join(tex_escape(c) for c in COLUMNS) + r" \\", r"\midrule"]
    for m in rows:
        cells = [tex_escape(c) for c in _cells(m, lambda s: s)]
        cells = [c.replace("x ", r"$\times$ ", 1) if i in RATIO_COLUMNS else c
                 for i, c in enumerate(cells)]
        cells = [c[:-1] + r"$\times$" if c.endswith("x") and c[:-1].replace(".", "").isdigit()
                 else c for c in cells]
        if m["status"] != "ok":
            cells[-1] = rf"\textit{{{cells[-1]}}}"
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"
