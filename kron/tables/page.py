"""The results page: ``kron-tables results PAGE`` runs what a page still lacks, within a time
budget, and renders the page (e.g. docs/results.md) from run records kept under its records
folder (e.g. docs/results/), so the page can be built over several invocations.

A page (``experiments/pages/<name>.yaml``) lists sections, each a declared table or a frontier
(``kron-tables frontier``) with its seeds and overrides. One invocation:

1. copies every committed record (``<records>/<table>/runs/<preset>/seed<k>/results.json``)
   back into the outputs tree, where ``kron-tables run`` looks for finished runs (a record whose
   overrides or composed config no longer match is rerun, as ``run`` decides);
2. runs the missing (row, seed) runs one row at a time, until the next row would not finish
   within ``--hours`` (its time estimated from the page's finished runs);
3. copies each finished run's results.json into the records folder (the model checkpoint stays
   in the outputs tree: records are small and meant to be committed), and renders every table
   (table.md, table.csv, runs.csv, plots) into ``<records>/<table>/`` and the page.

See docs/notes/results_plan.md for the command's design and the compute plan.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from kron.fileio import atomic_write_text
from kron.paths import EXPERIMENTS_DIR
from kron.tables.plots import PLOT_FILES
from kron.tables.results import RESULTS, collect, run_dir, table_dir
from kron.tables.run import pending, run_table, set_aside, stale
from kron.tables.spec import Table, load_table

PAGES_DIR = EXPERIMENTS_DIR / "pages"
DEFAULT_PAGE = "results"  # what `kron-tables results` builds when no page is named
PAGE_KEYS = {"name", "title", "page", "records", "hours", "machine", "plan", "sections"}
SECTION_KEYS = {"table", "seeds", "overrides", "frontier", "title"}
FRONTIER_KEYS = {"families", "param_ratios", "mac_ratios", "layers", "kron_shape_rule"}
COPIED = ("table.md", "table.csv", "runs.csv", *PLOT_FILES)


@dataclass(frozen=True)
class Section:
    """One table of the page: a declared table (or a frontier of it), its seeds, overrides,
    and a heading for when the overrides make the table's own title wrong (a synthetic
    stand-in for the real dataset)."""

    table: str
    seeds: int = 3
    overrides: tuple[str, ...] = ()
    frontier: dict[str, Any] | None = None
    title: str | None = None


@dataclass(frozen=True)
class Page:
    """A results page declaration (see the module docstring)."""

    name: str
    title: str
    page: str
    records: str
    sections: tuple[Section, ...]
    hours: float = 2.0
    machine: str = ""
    plan: tuple[str, ...] = field(default_factory=tuple)


def _check_keys(what: str, raw: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ValueError(f"{what}: expected a mapping, got {type(raw).__name__}")
    unknown = set(raw) - allowed
    if unknown:
        raise ValueError(f"{what}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return raw


def load_page(name: str) -> Page:
    """``experiments/pages/<name>.yaml``, or a path to a page file."""
    path = Path(name) if name.endswith(".yaml") else PAGES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PAGES_DIR.glob("*.yaml"))
        raise ValueError(f"no results page {name!r}; pages: {', '.join(known) or 'none'}")
    raw = _check_keys(str(path), yaml.safe_load(path.read_text()), PAGE_KEYS)
    sections = []
    for i, s in enumerate(raw.get("sections") or []):
        s = _check_keys(f"{path}: section {i}", s, SECTION_KEYS)
        if s.get("frontier") is not None:
            _check_keys(f"{path}: section {i} frontier", s["frontier"], FRONTIER_KEYS)
        sections.append(Section(str(s["table"]), int(s.get("seeds", 3)),
                                tuple(str(o) for o in s.get("overrides") or ()),
                                s.get("frontier"), s.get("title")))
    if not sections:
        raise ValueError(f"{path}: a page needs at least one section")
    return Page(str(raw.get("name", path.stem)), str(raw.get("title", path.stem)),
                str(raw["page"]), str(raw["records"]), tuple(sections),
                float(raw.get("hours", 2.0)), str(raw.get("machine", "")),
                tuple(str(p) for p in raw.get("plan") or ()))


def section_table(section: Section, out: str | Path | None) -> tuple[Table, tuple[str, ...]]:
    """The section's table and the overrides its runs take beyond the table's own (a frontier
    carries its overrides in its generated table), under the section's title if it has one."""
    table, extra = _section_table(section, out)
    return (replace(table, title=str(section.title)) if section.title else table), extra


def _section_table(section: Section, out: str | Path | None) -> tuple[Table, tuple[str, ...]]:
    if section.frontier is None:
        return load_table(section.table), section.overrides
    from kron.tables.frontier import write_frontier

    f = section.frontier
    key = "mac_ratio" if f.get("mac_ratios") else "param_ratio"
    budgets = [float(b) for b in f.get(key + "s") or ()]
    rule = {"kron_shape_rule": f["kron_shape_rule"]} if "kron_shape_rule" in f else {}
    table, _ = write_frontier(section.table, list(f["families"]), budgets, key,
                              section.overrides, f.get("layers"), out, section.seeds, **rule)
    return table, ()


def _record(records: Path, table: str, preset: str, seed: int) -> Path | None:
    """The committed record of a run: the table's own, else the same row config run for
    another table of the page (a frontier's dense row is the SVHN table's dense row). Whether
    it still matches what this table asks (overrides, composed config) is ``kron-tables
    run``'s check, so a borrowed record that differs is rerun."""
    rel = Path("runs") / preset / f"seed{seed}" / RESULTS
    own = records / table / rel
    if own.is_file():
        return own
    return next((p for p in sorted(records.glob(f"*/{rel.as_posix()}")) if p.is_file()), None)


def restore(table: Table, records: Path, out: str | Path | None, seeds: int,
            extra: Sequence[str] = ()) -> int:
    """Copy committed records back where ``kron-tables run`` finds finished runs; the count.

    A run already in the outputs tree keeps its record (a finished run not yet kept), unless
    that record is stale and differs from the committed one (left there by older code): then
    it is set aside and the committed record takes its place."""
    n = 0
    for row in table.rows:
        for s in range(seeds):
            rec = _record(records, table.name, row.preset, s)
            dst = run_dir(table.name, row, out, s) / RESULTS
            if rec is None:
                continue
            if dst.is_file():
                if dst.read_bytes() == rec.read_bytes():
                    continue
                why = stale(table, row, out, extra, "local", s)
                if why is None:
                    continue
                moved = set_aside(dst.parent)
                print(f"{table.name}: {row.id} seed {s}: the outputs tree's record is stale "
                      f"({why}); set aside as {moved}, the committed one restored")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(rec, dst)
            n += 1
    return n


def keep(table: Table, records: Path, out: str | Path | None, seeds: int,
         extra: Sequence[str] = ()) -> int:
    """Copy every finished run's results.json into the records; the count copied. A stale
    record (one the next invocation reruns) is never copied over a committed one."""
    n = 0
    for row in table.rows:
        for s in range(seeds):
            src = run_dir(table.name, row, out, s) / RESULTS
            dst = records / table.name / "runs" / row.preset / f"seed{s}" / RESULTS
            if not src.is_file() or (dst.is_file() and dst.read_bytes() == src.read_bytes()):
                continue
            why = stale(table, row, out, extra, "local", s)
            if why is not None:
                print(f"{table.name}: {row.id} seed {s}: not kept ({why}; it runs again)")
                continue
            atomic_write_text(dst, src.read_text())
            n += 1
    return n


def run_seconds(path: Path) -> float:
    """A finished run's training time (the sum of its epochs' train_seconds), 0 if unknown."""
    try:
        history = json.loads(path.read_text()).get("history") or []
    except (OSError, ValueError):
        return 0.0
    return float(sum(h.get("train_seconds", 0.0) for h in history))


def advance(section: Section, table: Table, extra: Sequence[str], out: str | Path | None,
            deadline: float, records: Path) -> tuple[int, bool]:
    """Run the section's missing runs, one row at a time, while the next row's estimated time
    (the mean of the records so far, see ``_estimate``) still fits before ``deadline``; each
    row's records are kept as soon as it finishes, so a stopped invocation loses at most the
    row it was running. Returns (exit code, all done)."""
    code = 0
    for row in table.rows:
        todo, _ = pending(table, [row], out, False, extra, "local", section.seeds)
        if not todo:
            continue
        estimate = _estimate(table, records)
        if time.monotonic() + estimate * len(todo) > deadline:
            print(f"{table.name}: {row.id} left for the next invocation "
                  f"({len(todo)} run(s), about {estimate * len(todo) / 60:.0f} min)")
            return code, False
        code = run_table(table, rows=[row.id], out=out, extra=extra,
                         seeds=section.seeds) or code
        kept = keep(table, records, out, section.seeds, extra)
        if kept:
            print(f"{table.name}: {kept} record(s) written under {records / table.name}",
                  flush=True)
    return code, True


def _estimate(table: Table, records: Path) -> float:
    """Seconds one more run of ``table`` will take: the mean of its recorded runs (+10 % for
    start-up and evaluation), else of every run on the page, else 0 (the row starts)."""
    for folder in (records / table.name / "runs", records):
        times = [t for t in map(run_seconds, folder.rglob(RESULTS)) if t > 0]
        if times:
            return 1.1 * sum(times) / len(times)
    return 0.0


def render_page(page: Page, tables: Sequence[tuple[Section, Table]],
                out: str | Path | None, complete: bool) -> Path:
    """Render every table into ``<records>/<table>/`` and the page from them."""
    from kron.tables.cli import render_table  # the CLI's renderer (cli imports this module)

    records, page_path = Path(page.records), Path(page.page)
    body, runs, finished, seconds = [], 0, 0, 0.0
    for section, table in tables:
        results = collect(table, out, section.seeds)
        md, _ = render_table(table, results, out, section.seeds)
        for name in COPIED:
            src = table_dir(table.name, out) / name
            if src.is_file():
                (records / table.name).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, records / table.name / name)
        runs += len(results)
        finished += sum(r.ok for r in results)
        seconds += sum(run_seconds(p) for p in
                       (records / table.name / "runs").rglob(RESULTS))
        plots = [n for n in COPIED if n.endswith(".png") and (records / table.name / n).is_file()]
        links = [f"![{n[:-4]}]({os.path.relpath(records / table.name / n, page_path.parent)})"
                 for n in plots]
        body += [md, *links, ""]
    head = [f"# {page.title}", "",
            "Generated by `kron-tables results"
            + ("" if page.name == DEFAULT_PAGE else " " + page.name) + "`; do not edit by hand. "
            f"{finished} of {runs} runs finished"
            + ("" if complete else " (the rest run at the next invocation)")
            + f"; training time of the finished runs: {seconds / 3600:.1f} h"
            + (f" on {page.machine}" if page.machine else "") + "."]
    if page.plan:
        head += ["", "Compute plan:", ""] + [f"- {line}" for line in page.plan]
    return atomic_write_text(page_path, "\n".join([*head, "", *body]).rstrip() + "\n")


def build(page: Page, out: str | Path | None = None, hours: float | None = None,
          dry_run: bool = False) -> int:
    """One invocation of ``kron-tables results``: restore records, run what is missing within
    ``hours`` (default the page's), keep the new records, render the page. Returns the first
    non-zero exit status of the runs (0 when none failed)."""
    deadline = time.monotonic() + 3600.0 * (page.hours if hours is None else hours)
    records = Path(page.records)
    sections = [(s, *section_table(s, out)) for s in page.sections]
    for s, table, extra in sections:
        n = restore(table, records, out, s.seeds, extra)
        if n:
            print(f"{table.name}: {n} finished run(s) restored from {records / table.name}")
    code, complete = 0, True
    for s, table, extra in sections:
        if dry_run:
            todo, _ = pending(table, list(table.rows), out, False, extra, "local", s.seeds)
            print(f"{table.name}: {len(todo)} run(s) to do")
            continue
        if complete:
            c, complete = advance(s, table, extra, out, deadline, records)
            code = code or c
        kept = keep(table, records, out, s.seeds, extra)
        if kept:
            print(f"{table.name}: {kept} record(s) written under {records / table.name}")
    if dry_run:
        return 0
    path = render_page(page, [(s, t) for s, t, _ in sections], out, complete)
    print(f"wrote {path}" + ("" if complete else " (incomplete: run the command again)"))
    return code
