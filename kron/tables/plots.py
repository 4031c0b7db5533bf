"""Accuracy/cost trade-off plots with error bars and the Pareto front (matplotlib, headless).

Error is plotted against parameters (fewer is better) and against measured speedup (more is
better), at the latency batch and, when the runs measured one, at the throughput batch. Each
row is one point at its seeds' mean, with error bars of one sample standard deviation (error,
and speedup, which varies between runs) when two or more seeds finished; families have
distinct markers, and the rows no other row beats on both axes (by their means) are joined by
the front line. The frontier plots (:func:`frontier_figure`) draw one line per
family through its budgets instead.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kron.fileio import atomic_write

STYLE = {  # family -> marker, colour, legend label
    "dense": ("*", "black", "dense"),
    "kron": ("o", "tab:blue", "Kronecker"),
    "lowrank": ("s", "tab:orange", "low-rank"),
    "separable": ("^", "tab:red", "separable (k x 1, 1 x k)"),
    "cp": ("D", "tab:purple", "CP"),
    "tucker": ("v", "tab:brown", "Tucker-2"),
}
#: (row key, file name, x label, more is better, log x); speedups are measured, never modelled
PLOTS = (("params", "error_vs_params", "parameters (log scale)", False, True),
         ("speedup", "error_vs_speedup",
          "measured speedup over the dense twin, latency batch (x)", True, False),
         ("throughput_speedup", "error_vs_throughput_speedup",
          "measured speedup over the dense twin, throughput batch (x)", True, False))
SPEEDUPS = ("speedup", "throughput_speedup")


def plot_name(name: str, frontier: bool) -> str:
    """The file stem of a plot of :data:`PLOTS`: ``error_vs_*``, or ``frontier_*`` for the
    frontier's one-line-per-family version."""
    return name.replace("error_vs", "frontier") if frontier else name


#: every plot file a rendered table or frontier can hold (PNG; each has a PDF twin)
PLOT_FILES = tuple(f"{plot_name(name, frontier)}.png"
                   for frontier in (False, True) for _, name, *_ in PLOTS)


def pareto_front(points: Sequence[tuple[float, float]], maximize_x: bool = False) -> list[int]:
    """Indices of the points no other point dominates (error ``y`` minimised; ``x`` minimised,
    or maximised with ``maximize_x``), sorted by ``x``."""
    def better_or_equal(a, b):  # a at least as good as b on both axes
        ax, bx = (-a[0], -b[0]) if maximize_x else (a[0], b[0])
        return ax <= bx and a[1] <= b[1]

    front = [i for i, p in enumerate(points)
             if not any(better_or_equal(q, p) and q != p for j, q in enumerate(points) if j != i)]
    return sorted(front, key=lambda i: points[i][0])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean(s: Any) -> float | None:
    return None if s is None else s.mean


def _std(s: Any) -> float:
    return 0.0 if s is None or s.std is None else s.std


def _errorbar(ax, pts: Sequence[dict[str, Any]], x_key: str, **kw) -> None:
    """One errorbar container for ``pts``: y = error, bars = one std (x too, for speedup)."""
    xs = [_mean(m[x_key]) for m in pts]
    ys = [_mean(m["test_err1"]) for m in pts]
    yerr = [_std(m["test_err1"]) for m in pts]
    xerr = [_std(m[x_key]) for m in pts] if x_key in SPEEDUPS else None
    ax.errorbar(xs, ys, yerr=yerr, xerr=xerr, capsize=3, elinewidth=1, **kw)


def _finish(fig, ax, *, have: bool, left_out: list[str], title: str, xlabel: str,
            log_x: bool, vline: bool) -> None:
    if vline and have:  # speedup plot: where the dense twin's speed is
        ax.axvline(1.0, color="0.6", lw=0.8, ls=":", zorder=1)
    if log_x and have:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test error (%)")
    ax.set_title(textwrap.fill(title, 70), fontsize=10)  # long table titles wrap, not clip
    ax.grid(True, alpha=0.3, which="both")
    if have:
        ax.legend(fontsize=8, loc="best")
    if left_out:
        fig.text(0.01, 0.01, "not shown (no result): " + ", ".join(left_out), fontsize=7,
                 color="0.4")
    if not have:
        ax.text(0.5, 0.5, "no results yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout(rect=(0, 0.04, 1, 1) if left_out else (0, 0, 1, 1))


def _start(rows: Sequence[dict[str, Any]], x_key: str) -> tuple[Any, Any, list, list[str]]:
    """A new figure and axes, the rows that have both ``x_key`` and an error, and the ids of
    those that do not (listed under the axes by :func:`_finish`)."""
    have = [m for m in rows if m.get(x_key) is not None and m.get("test_err1") is not None]
    left_out = [m["id"] for m in rows if m not in have]
    fig, ax = _pyplot().subplots(figsize=(6.4, 4.4), dpi=110)
    return fig, ax, have, left_out


def tradeoff_figure(rows: Sequence[dict[str, Any]], x_key: str, *, title: str, xlabel: str,
                    maximize_x: bool, log_x: bool):
    """The figure of error against ``x_key``: one errorbar container per family present, the
    Pareto front as a line; rows without both numbers are listed under the axes."""
    fig, ax, have, left_out = _start(rows, x_key)
    for fam, (marker, colour, label) in STYLE.items():
        pts = [m for m in have if m["family"] == fam]
        if pts:
            _errorbar(ax, pts, x_key, fmt=marker, color=colour, ms=10 if fam == "dense" else 6,
                      label=label, zorder=3)
    for m in have:
        ax.annotate(m["id"], (_mean(m[x_key]), _mean(m["test_err1"])),
                    textcoords="offset points", xytext=(4, 4), fontsize=7, color="0.25")
    front = pareto_front([(_mean(m[x_key]), _mean(m["test_err1"])) for m in have], maximize_x)
    if front:
        xs = [_mean(have[i][x_key]) for i in front]
        ys = [_mean(have[i]["test_err1"]) for i in front]
        ax.plot(xs, ys, "--", color="tab:green", lw=1.2, zorder=2, label="Pareto front",
                drawstyle="steps-post" if not maximize_x else "steps-pre")
        ax.scatter(xs, ys, s=160, facecolors="none", edgecolors="tab:green", lw=1.2, zorder=4)
    _finish(fig, ax, have=bool(have), left_out=left_out, title=title, xlabel=xlabel,
            log_x=log_x, vline=maximize_x)
    return fig


def frontier_figure(rows: Sequence[dict[str, Any]], x_key: str, *, title: str, xlabel: str,
                    log_x: bool, vline: bool):
    """Error against ``x_key`` with one line (an errorbar container) per family through its
    budgets, sorted by x; dense rows are a horizontal reference line."""
    fig, ax, have, left_out = _start(rows, x_key)
    for fam, (marker, colour, label) in STYLE.items():
        pts = sorted((m for m in have if m["family"] == fam), key=lambda m: _mean(m[x_key]))
        if not pts:
            continue
        if fam == "dense":
            e = pts[0]["test_err1"]
            ax.axhline(e.mean, color=colour, lw=1, ls="--", label=f"dense ({e.mean:.2f} %)")
            if e.std:
                ax.axhspan(e.low, e.high, color=colour, alpha=0.08, lw=0)
            continue
        _errorbar(ax, pts, x_key, fmt=marker + "-", color=colour, ms=5, label=label, zorder=3)
    _finish(fig, ax, have=bool(have), left_out=left_out, title=title, xlabel=xlabel,
            log_x=log_x, vline=vline)
    return fig


def save_figure(fig, path: str | Path) -> list[Path]:
    """Write ``fig`` as ``path`` (.png) and the same name with .pdf; close it."""
    path = Path(path)
    written = [atomic_write(target, lambda t, f=fmt: fig.savefig(t, format=f))
               for target, fmt in ((path.with_suffix(".png"), "png"),
                                   (path.with_suffix(".pdf"), "pdf"))]
    _pyplot().close(fig)
    return written


def _plot_all(rows: Sequence[dict[str, Any]], outdir: str | Path, title: str,
              frontier: bool) -> list[Path]:
    written = []
    for key, name, xlabel, maximize_x, log_x in PLOTS:
        if key == "throughput_speedup" and not any(m.get(key) is not None for m in rows):
            continue  # no run measured a throughput batch: no empty figure
        if frontier:
            fig = frontier_figure(rows, key, title=title, xlabel=xlabel, log_x=log_x,
                                  vline=maximize_x)
        else:
            fig = tradeoff_figure(rows, key, title=title, xlabel=xlabel, maximize_x=maximize_x,
                                  log_x=log_x)
        written += save_figure(fig, Path(outdir) / f"{plot_name(name, frontier)}.png")
    return written


def plot_table(rows: Sequence[dict[str, Any]], outdir: str | Path, title: str) -> list[Path]:
    """The plots of a rendered table: ``error_vs_params``, ``error_vs_speedup`` and, when
    some run measured a throughput batch, ``error_vs_throughput_speedup``."""
    return _plot_all(rows, outdir, title, frontier=False)


def plot_frontier(rows: Sequence[dict[str, Any]], outdir: str | Path, title: str) -> list[Path]:
    """The frontier's plots: ``frontier_params``, ``frontier_speedup`` and, when some run
    measured a throughput batch, ``frontier_throughput_speedup``."""
    return _plot_all(rows, outdir, title, frontier=True)
