"""Accuracy/cost trade-off plots with the Pareto front marked (matplotlib, headless).

Error is plotted against parameters (fewer is better) and against measured speedup (more is
better); dense, Kronecker and low-rank rows have distinct markers, and the rows no other row
beats on both axes are joined by the front line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kron.fileio import atomic_write

STYLE = {  # family -> marker, colour, legend label
    "dense": ("*", "black", "dense"),
    "kron": ("o", "tab:blue", "Kronecker"),
    "lowrank": ("s", "tab:orange", "low-rank"),
}


def pareto_front(points: Sequence[tuple[float, float]], maximize_x: bool = False) -> list[int]:
    """Indices of the points no other point dominates (error ``y`` minimised; ``x`` minimised,
    or maximised with ``maximize_x``), sorted by ``x``."""
    def better_or_equal(a, b):  # a at least as good as b on both axes
        ax, bx = (-a[0], -b[0]) if maximize_x else (a[0], b[0])
        return ax <= bx and a[1] <= b[1]

    front = [i for i, p in enumerate(points)
             if not any(better_or_equal(q, p) and q != p for j, q in enumerate(points) if j != i)]
    return sorted(front, key=lambda i: points[i][0])


def plot_tradeoff(rows: Sequence[dict[str, Any]], x_key: str, path: str | Path, *,
                  title: str, xlabel: str, maximize_x: bool, log_x: bool) -> list[Path]:
    """Plot error against ``x_key`` for the rows that have both; writes ``path`` (.png) and the
    same name with .pdf. Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have = [m for m in rows if m.get(x_key) is not None and m.get("test_err1") is not None]
    left_out = [m["id"] for m in rows if m not in have]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    for fam, (marker, colour, label) in STYLE.items():
        pts = [m for m in have if m["family"] == fam]
        if pts:
            ax.scatter([m[x_key] for m in pts], [m["test_err1"] for m in pts], marker=marker,
                       c=colour, s=90 if fam == "dense" else 45, label=label, zorder=3)
    for m in have:
        ax.annotate(m["id"], (m[x_key], m["test_err1"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7, color="0.25")
    front = pareto_front([(m[x_key], m["test_err1"]) for m in have], maximize_x)
    if front:
        xs = [have[i][x_key] for i in front]
        ys = [have[i]["test_err1"] for i in front]
        ax.plot(xs, ys, "--", color="tab:green", lw=1.2, zorder=2, label="Pareto front",
                drawstyle="steps-post" if not maximize_x else "steps-pre")
        ax.scatter(xs, ys, s=160, facecolors="none", edgecolors="tab:green", lw=1.2, zorder=4)
    if maximize_x and have:  # speedup plot: where the dense twin's speed is
        ax.axvline(1.0, color="0.6", lw=0.8, ls=":", zorder=1)
    if log_x and have:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test error (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    if have:
        ax.legend(fontsize=8, loc="best")
    if left_out:
        fig.text(0.01, 0.01, "not shown (no result): " + ", ".join(left_out), fontsize=7,
                 color="0.4")
    if not have:
        ax.text(0.5, 0.5, "no results yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout(rect=(0, 0.04, 1, 1) if left_out else (0, 0, 1, 1))
    path = Path(path)
    written = []
    for target, fmt in ((path.with_suffix(".png"), "png"), (path.with_suffix(".pdf"), "pdf")):
        written.append(atomic_write(target, lambda t, f=fmt: fig.savefig(t, format=f)))
    plt.close(fig)
    return written


def plot_table(rows: Sequence[dict[str, Any]], outdir: str | Path, title: str) -> list[Path]:
    """The two plots of a rendered table: ``error_vs_params`` and ``error_vs_speedup``."""
    outdir = Path(outdir)
    return [
        *plot_tradeoff(rows, "params", outdir / "error_vs_params.png", title=title,
                       xlabel="parameters (log scale)", maximize_x=False, log_x=True),
        *plot_tradeoff(rows, "speedup", outdir / "error_vs_speedup.png", title=title,
                       xlabel="measured inference speedup over the dense twin (x)",
                       maximize_x=True, log_x=False),
    ]
