"""``kron-tables``: list, run, render and sweep paper tables; ``demo`` is ``make demo``.

    kron-tables list
    kron-tables run svhn [--seeds 3] [--rows dense,kron_c16] [--redo] [--launcher joblib]
                         [overrides]
    kron-tables render svhn [--seeds 3] [--wandb ENTITY/PROJECT | --wandb DIR]
    kron-tables sweep NAME --layer classifier.fc1 --param-ratio 0.05 [--seeds N] [overrides]
    kron-tables frontier svhn_demo --families kron,lowrank,separable,cp,tucker
                         --param-ratios 0.05,0.1,0.2 [--seeds 3] [overrides]
    kron-tables demo
    kron-tables results [PAGE] [--hours 2] [--dry-run]   (docs/results.md; resumable)

Outputs go to ``$KRON_OUTPUTS`` (default ``outputs``)/tables/<table>/: runs/<preset>/seed<k>/,
table.md, table.csv (one line per row), runs.csv (one per run), table.tex,
error_vs_params.png/.pdf, error_vs_speedup.png/.pdf and, when the runs measured a throughput
batch, error_vs_throughput_speedup.png/.pdf; a frontier adds its best-family-per-budget table
to table.md and frontier_params, frontier_speedup (and frontier_throughput_speedup) .png/.pdf.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kron.fileio import atomic_write_text
from kron.layers.shapes import SHAPE_RULES
from kron.tables import render as R
from kron.tables.frontier import KRON_SHAPE_RULE
from kron.tables.page import DEFAULT_PAGE
from kron.tables.plots import plot_frontier, plot_table
from kron.tables.results import RunResult, collect, collect_wandb, row_dir, table_dir
from kron.tables.run import run_table
from kron.tables.spec import Table, list_tables, load_table

DEMO_TABLE = "svhn_demo"


def find_table(name: str, out: str | Path | None = None) -> Table:
    """A declared table (experiments/), else a generated one (<out>/tables/<name>/table.yaml)."""
    generated = table_dir(name, out) / "table.yaml"
    if name not in list_tables() and generated.is_file():
        return load_table(str(generated))
    return load_table(name)


def render_table(table: Table, results: Sequence[RunResult], out: str | Path | None = None,
                 seeds: int | None = None) -> tuple[str, list[Path]]:
    """Write table.md/.csv/.tex, runs.csv and the plots (and a frontier's own); returns the
    Markdown and the written paths."""
    folder = table_dir(table.name, out)
    md = R.to_markdown(table, results, seeds)
    rows = R.metrics(results, table.reference, seeds)
    if any(r.budget is not None for r in table.rows):  # a frontier
        from kron.tables.frontier import frontier_markdown

        md += "\n" + frontier_markdown(table, rows)
    paths = [atomic_write_text(folder / "table.md", md),
             atomic_write_text(folder / "table.csv",
                               R.to_csv(table, results, base=folder, asked=seeds)),
             atomic_write_text(folder / "runs.csv", R.runs_csv(results, base=folder)),
             atomic_write_text(folder / "table.tex", R.to_latex(table, results, seeds))]
    paths += plot_table(rows, folder, table.title)
    if any(r.budget is not None for r in table.rows):
        paths += plot_frontier(rows, folder, table.title)
    return md, paths


def read_results(table: Table, args: argparse.Namespace) -> list[RunResult]:
    """The table's runs from local results.json, a W&B project, or W&B offline runs (a
    folder given to --wandb)."""
    seeds = getattr(args, "seeds", None)
    source = getattr(args, "wandb", None)
    if not source:
        return collect(table, args.out, seeds)
    if Path(source).is_dir():
        from kron.tables.wandb_offline import OfflineRuns

        return collect_wandb(table, str(source), OfflineRuns(source), seeds)
    return collect_wandb(table, source, seeds=seeds)


def cmd_render(args: argparse.Namespace) -> int:
    table = find_table(args.table, args.out)
    results = read_results(table, args)
    n = len(results) // max(1, len(table.rows))
    md, paths = render_table(table, results, args.out, n)
    if not args.quiet:
        print(md)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    table = find_table(args.table, args.out)
    rows = args.rows.split(",") if args.rows else None
    code = run_table(table, rows=rows, out=args.out, redo=args.redo, launcher=args.launcher,
                     extra=args.overrides, dry_run=args.dry_run, seeds=args.seeds)
    if args.render and not args.dry_run:
        cmd_render(argparse.Namespace(table=table.name, out=args.out, wandb=None,
                                      quiet=False, seeds=args.seeds))
    return code


def cmd_sweep(args: argparse.Namespace) -> int:
    from kron.tables.sweep import compose_base, enumerate_points, write_sweep

    cfg = compose_base(args.overrides)
    points = enumerate_points(cfg, args.layer, rank=args.rank, param_ratio=args.param_ratio,
                              mac_ratio=args.mac_ratio)
    budget = ", ".join(f"{k} <= {v}" for k, v in (("param ratio", args.param_ratio),
                                                   ("MAC ratio", args.mac_ratio)) if v)
    print(f"sweep {args.name}: {len(points)} shape(s) within {budget}:")
    for p in points:
        f = p.shape
        mac = "" if f.mac_ratio is None else f"  MAC ratio {f.mac_ratio:.4f}"
        print(f"  {p.layer:24s} A {str(f.a_shape):18s} B {str(f.b_shape):18s} "
              f"params {f.params:>9,}  ratio {f.param_ratio:.4f}{mac}")
    if len(points) > args.max_points:
        print(f"{len(points)} runs exceed --max-points {args.max_points}; tighten the budget or "
              "raise --max-points", file=sys.stderr)
        return 2
    table = write_sweep(args.name, cfg, points, args.overrides, args.out, budget)
    print(f"wrote {table_dir(table.name, args.out) / 'table.yaml'} and its presets")
    return run_and_render(table, args)


def run_and_render(table: Table, args: argparse.Namespace) -> int:
    """Run a generated table's pending runs, then render it (unless a dry run)."""
    code = run_table(table, out=args.out, redo=args.redo, launcher=args.launcher,
                     dry_run=args.dry_run, seeds=args.seeds)
    if not args.dry_run:
        cmd_render(argparse.Namespace(table=table.name, out=args.out, wandb=None, quiet=False,
                                      seeds=args.seeds))
    return code


def cmd_frontier(args: argparse.Namespace) -> int:
    from kron.tables.frontier import parse_list, write_frontier

    if (args.param_ratios is None) == (args.mac_ratios is None):
        raise ValueError("give exactly one of --param-ratios or --mac-ratios")
    key = "param_ratio" if args.param_ratios is not None else "mac_ratio"
    budgets = parse_list(args.param_ratios or args.mac_ratios, f"--{key.replace('_', '-')}s",
                         float)
    families = parse_list(args.families, "--families")
    layers = parse_list(args.layers, "--layers") if args.layers else None
    rule = {"kron_shape_rule": args.kron_shape_rule} if args.kron_shape_rule else {}
    table, skipped = write_frontier(args.target, families, budgets, key, args.overrides,
                                    layers, args.out, args.seeds or 1, **rule)
    for s in skipped:
        print(f"left out {s}")
    runs = len(table.rows) * (args.seeds or 1)
    print(f"frontier {table.name}: {len(table.rows)} rows x {args.seeds or 1} seed(s) = "
          f"{runs} runs; {table_dir(table.name, args.out) / 'table.yaml'}")
    if runs > args.max_runs:
        print(f"{runs} runs exceed --max-runs {args.max_runs}; fewer budgets/families/seeds or "
              "raise --max-runs", file=sys.stderr)
        return 2
    return run_and_render(table, args)


def cmd_list(args: argparse.Namespace) -> int:
    for name in list_tables():
        t = load_table(name)
        print(f"{name:22s} {len(t.rows):2d} rows  {t.title}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Generate synthetic SVHN, run the small SVHN table, render it, say where things are."""
    from kron.config_compose import compose_train
    from kron.data.synthetic import ensure_synth_svhn

    t0 = time.perf_counter()
    table = load_table(DEMO_TABLE)
    cfg = compose_train([f"preset={table.rows[0].preset}", *table.overrides])
    print(f"[demo] synthetic SVHN in {cfg.data.root} (rendered on first use)", flush=True)
    ensure_synth_svhn(cfg.data.root, **cfg.data.synth)
    seeds = args.seeds or table.seeds
    code = run_table(table, out=args.out, redo=args.redo, seeds=seeds)
    results = collect(table, args.out, seeds)
    md, paths = render_table(table, results, args.out, seeds)
    folder = table_dir(table.name, args.out)
    print("\n" + md)
    print(f"[demo] table: {folder / 'table.md'} (.csv, .tex)")
    print(f"[demo] plots: {folder / 'error_vs_params.png'}, {folder / 'error_vs_speedup.png'} "
          "(and .pdf)")
    offline = [p for r in table.rows
               for p in sorted(row_dir(table.name, r, args.out).glob("seed*/wandb/offline-run-*"))]
    if offline:
        print(f"[demo] W&B offline runs ({len(offline)}); upload them with:")
        for p in offline:
            print(f"         wandb sync {p}")
    else:
        print("[demo] no W&B offline runs (WANDB_MODE was disabled?)")
    print(f"[demo] wall time {time.perf_counter() - t0:.0f} s")
    return code or (0 if all(r.status == "ok" for r in results) else 1)


def cmd_results(args: argparse.Namespace) -> int:
    from kron.tables.page import build, load_page

    return build(load_page(args.page), args.out, args.hours, args.dry_run)


def _parents() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The options every command with outputs takes (--out), and those of the commands that
    train runs (--redo, --launcher, --dry-run)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default=None,
                        help="outputs root (default $KRON_OUTPUTS or outputs)")
    launching = argparse.ArgumentParser(add_help=False)
    launching.add_argument("--redo", action="store_true",
                           help="rerun what already has results.json")
    launching.add_argument("--launcher", default="local",
                           help="a configs/launcher/ name: local (default), joblib, slurm, "
                                "slurm_cpu, submitit_local")
    launching.add_argument("--dry-run", action="store_true",
                           help="print the command, run nothing")
    return common, launching


def _add_run_render(sub, common, launching) -> None:
    r = sub.add_parser("run", parents=[common, launching],
                       help="launch a table's runs (a Hydra multirun)")
    r.add_argument("table")
    r.add_argument("--rows", help="comma-separated row ids (default: all)")
    r.add_argument("--render", action="store_true", help="render the table afterwards")
    r.add_argument("--seeds", type=int, help="seeds 0..N-1 per row (default: the table's)")
    r.add_argument("overrides", nargs="*", help="extra Hydra overrides for every row")
    r.set_defaults(fn=cmd_run)

    d = sub.add_parser("render", parents=[common], help="write table.md/.csv/.tex and the plots")
    d.add_argument("table")
    d.add_argument("--wandb", metavar="ENTITY/PROJECT|DIR",
                   help="read results from W&B summaries instead of local results.json (a "
                        "folder: the W&B offline runs under it, no server needed)")
    d.add_argument("--seeds", type=int,
                   help="seeds asked per row (default: the table's, or as many as ran)")
    d.add_argument("--quiet", action="store_true", help="do not print the Markdown")
    d.set_defaults(fn=cmd_render)


def _add_generators(sub, common, launching) -> None:
    s = sub.add_parser("sweep", parents=[common, launching],
                       help="train every Kronecker shape of layers within a budget")
    s.add_argument("name")
    s.add_argument("--layer", action="append", required=True,
                   help="layer name or glob (repeatable; swept one at a time)")
    s.add_argument("--param-ratio", type=float)
    s.add_argument("--mac-ratio", type=float)
    s.add_argument("--rank", type=int, default=1)
    s.add_argument("--max-points", type=int, default=40)
    s.add_argument("--seeds", type=int, help="seeds 0..N-1 per point (default 1)")
    s.add_argument("overrides", nargs="*", help="Hydra overrides of the base config")
    s.set_defaults(fn=cmd_sweep)

    f = sub.add_parser("frontier", parents=[common, launching],
                       help="each family at matched budgets: error vs params and vs speedup")
    f.add_argument("target", metavar="TABLE_OR_MODEL",
                   help="a declared table (its dense row and overrides) or a model config")
    f.add_argument("--families", default="kron,lowrank,separable,cp,tucker")
    f.add_argument("--param-ratios", help="per-layer parameter ratios, e.g. 0.05,0.1,0.2")
    f.add_argument("--mac-ratios", help="per-layer MAC ratios (instead of --param-ratios)")
    f.add_argument("--layers", help="layer names/globs to swap (default: all but the input "
                                    "and output layers)")
    f.add_argument("--seeds", type=int, help="seeds 0..N-1 per point (default 1)")
    f.add_argument("--kron-shape-rule", choices=SHAPE_RULES,
                   help=f"how a budget picks the Kronecker shapes (default {KRON_SHAPE_RULE}; "
                        "docs/design.md, D11)")
    f.add_argument("--max-runs", type=int, default=60)
    f.add_argument("overrides", nargs="*", help="Hydra overrides of the base config")
    f.set_defaults(fn=cmd_frontier)


def _add_demo_results(sub, common) -> None:
    m = sub.add_parser("demo", parents=[common],
                       help="make demo: the small SVHN table on synthetic data")
    m.add_argument("--redo", action="store_true")
    m.add_argument("--seeds", type=int, help="seeds per row (default: the demo table's)")
    m.set_defaults(fn=cmd_demo)

    g = sub.add_parser("results", parents=[common],
                       help="run what a results page lacks (within --hours), render the page")
    g.add_argument("page", nargs="?", default=DEFAULT_PAGE,
                   help=f"experiments/pages/<PAGE>.yaml or a path (default: {DEFAULT_PAGE})")
    g.add_argument("--hours", type=float, help="time budget (default: the page's)")
    g.add_argument("--dry-run", action="store_true", help="say what is missing, run nothing")
    g.set_defaults(fn=cmd_results)


def build_parser() -> argparse.ArgumentParser:
    """The ``kron-tables`` command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog="kron-tables", description=__doc__.split("\n")[0])
    common, launching = _parents()
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the declared tables").set_defaults(fn=cmd_list)
    _add_run_render(sub, common, launching)
    _add_generators(sub, common, launching)
    _add_demo_results(sub, common)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:  # overrides placed after options (argparse stops collecting positionals there)
        if not hasattr(args, "overrides") or any(r.startswith("-") for r in rest):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides = [*args.overrides, *rest]
    from kron.errors import KronError, debug_wanted, one_line

    try:
        return args.fn(args)
    except (ValueError, KeyError, KronError) as err:  # kron's errors, the data's, the layers'
        if debug_wanted():
            raise
        print(f"kron-tables: error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
