"""kron-tables results: a page built over several invocations from committed run records --
records restored, missing runs left for the next invocation when the time budget is short,
finished runs kept as records, the page rendered from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kron.tables import page as P
from kron.tables.cli import main
from kron.tables.results import RESULTS, run_dir
from kron.tables.run import composed_config, job_overrides

TABLE = {"name": "tiny", "title": "Tiny table", "reference": "dense", "headline": False,
         "overrides": ["data=synth_svhn"],
         "rows": [{"id": "dense", "preset": "svhn_table/dense", "label": "Dense",
                   "family": "dense"},
                  {"id": "lowrank_fc", "preset": "svhn_table/lowrank_fc",
                   "label": "Low-rank FC", "family": "lowrank"}]}


def record(table, row, seed, acc, seconds):
    """A results.json as kron.train writes it (the fields the tables read), with the config
    the row's overrides compose to now (so it is not stale)."""
    overrides = job_overrides(table, table.row(row), seed=seed)
    config = composed_config(overrides)
    return {"test_acc1": acc, "params": 100, "params_dense": 400, "macs_executed": 10,
            "macs_analytic": 10, "macs_dense": 40, "speedup": 2.0, "latency_ms": 1.0,
            "latency_dense_ms": 2.0, "epochs_done": config["epochs"], "config": config,
            "history": [{"train_seconds": seconds}], "overrides": overrides}


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A declared tiny table, a page of it with 2 seeds, records of dense's two seeds and
    lowrank_fc's seed 0 (lowrank_fc seed 1 is missing)."""
    exps = tmp_path / "experiments"
    (exps / "pages").mkdir(parents=True)
    (exps / "tiny.yaml").write_text(yaml.safe_dump(TABLE))
    monkeypatch.setenv("KRON_EXPERIMENTS", str(exps))
    spec = {"name": "tiny_page", "title": "Tiny results", "page": str(tmp_path / "docs/r.md"),
            "records": str(tmp_path / "docs/r"), "hours": 2, "machine": "2 CPU cores",
            "plan": ["2 rows x 2 seeds x 1 min"], "sections": [{"table": "tiny", "seeds": 2}]}
    path = exps / "pages" / "tiny_page.yaml"
    path.write_text(yaml.safe_dump(spec))
    page = P.load_page(str(path))
    table, _ = P.section_table(page.sections[0], None)
    for row, seed, acc in (("dense", 0, 90.0), ("dense", 1, 91.0), ("lowrank_fc", 0, 80.0)):
        rec = Path(page.records) / "tiny" / "runs" / table.row(row).preset / f"seed{seed}"
        rec.mkdir(parents=True)
        (rec / RESULTS).write_text(json.dumps(record(table, row, seed, acc, 600.0)))
    return page, table, tmp_path / "out"


def test_a_short_budget_leaves_the_missing_run_for_the_next_invocation(tiny, monkeypatch):
    page, table, out = tiny
    monkeypatch.setattr(P, "run_table", lambda *a, **k: pytest.fail("nothing fits: no run"))
    # the records' mean (600 s, +10 %) does not fit in 0.1 h
    assert P.build(page, out, hours=0.1) == 0
    for row, seed in (("dense", 0), ("dense", 1), ("lowrank_fc", 0)):  # restored
        assert (run_dir("tiny", table.row(row), out, seed) / RESULTS).is_file()
    text = Path(page.page).read_text()
    assert text.startswith("# Tiny results\n")
    assert ("3 of 4 runs finished (the rest run at the next invocation); training time of "
            "the finished runs: 0.5 h on 2 CPU cores.") in text
    assert "- 2 rows x 2 seeds x 1 min" in text and "## Tiny table" in text
    assert "| Dense | dense | 2 | 90.50 ± 0.71 |" in text
    assert "![error_vs_params](r/tiny/error_vs_params.png)" in text
    for name in ("table.md", "table.csv", "runs.csv", "error_vs_params.png"):
        assert (Path(page.records) / "tiny" / name).is_file()


def test_runs_that_fit_are_run_and_kept_as_records(tiny, monkeypatch):
    page, table, out = tiny
    ran = []

    def fake_run(t, rows, out, extra, seeds):  # what kron.train would leave behind
        ran.append((rows, seeds))
        folder = run_dir(t.name, t.row(rows[0]), out, 1)
        folder.mkdir(parents=True)
        (folder / RESULTS).write_text(json.dumps(record(t, rows[0], 1, 82.0, 540.0)))
        return 0

    monkeypatch.setattr(P, "run_table", fake_run)
    assert P.build(page, out, hours=1.0) == 0
    assert ran == [(["lowrank_fc"], 2)]  # only the row with a missing seed
    kept = Path(page.records) / "tiny/runs/svhn_table/lowrank_fc/seed1" / RESULTS
    assert json.loads(kept.read_text())["test_acc1"] == 82.0
    text = Path(page.page).read_text()
    assert "4 of 4 runs finished; training time of the finished runs: 0.7 h" in text
    assert "| Low-rank FC | lowrank | 2 | 81.00 ± 1.41 |" in text
    # the next invocation has nothing to run and writes the same page
    monkeypatch.setattr(P, "run_table", lambda *a, **k: pytest.fail("all done: no run"))
    assert P.build(page, out) == 0 and Path(page.page).read_text() == text


def test_cli_dry_run_and_bad_pages(tiny, capsys, tmp_path):
    page, _, out = tiny
    path = str(Path(tmp_path) / "experiments/pages/tiny_page.yaml")
    assert main(["results", path, "--out", str(out), "--dry-run"]) == 0
    assert "tiny: 1 run(s) to do" in capsys.readouterr().out
    assert not Path(page.page).exists()
    assert main(["results", "no_such_page"]) == 2
    assert "no results page 'no_such_page'" in capsys.readouterr().err
    bad = Path(tmp_path) / "bad.yaml"
    bad.write_text(yaml.safe_dump({"page": "x.md", "records": "r", "sections": [],
                                   "colour": "red"}))
    assert main(["results", str(bad)]) == 2
    assert "unknown key(s) ['colour']" in capsys.readouterr().err


def test_a_row_run_for_another_table_of_the_page_is_borrowed_not_rerun(tiny, monkeypatch):
    """A second table with the same dense row (same config, same overrides) restores dense
    from the first table's records; its own row without any record is the one left to run."""
    page, table, out = tiny
    exps = Path(page.page).parent.parent / "experiments"
    twin = {**TABLE, "name": "tiny2", "rows": TABLE["rows"][:1] + [
        {"id": "separable", "preset": "svhn_table/separable", "label": "Separable",
         "family": "lowrank"}]}
    (exps / "tiny2.yaml").write_text(yaml.safe_dump(twin))
    page = P.Page(page.name, page.title, page.page, page.records,
                  (*page.sections, P.Section("tiny2", 2)), page.hours, page.machine, page.plan)
    ran = []
    monkeypatch.setattr(P, "run_table", lambda t, rows, **k: ran.append((t.name, rows)) or 0)
    P.build(page, out, hours=1.0)
    tiny2, _ = P.section_table(page.sections[1], out)
    for seed in (0, 1):
        got = run_dir("tiny2", tiny2.row("dense"), out, seed) / RESULTS
        assert json.loads(got.read_text())["test_acc1"] == 90.0 + seed
    assert ("tiny2", ["separable"]) in ran and ("tiny2", ["dense"]) not in ran



def test_a_stale_record_in_the_outputs_tree_never_replaces_a_committed_one(tiny, monkeypatch,
                                                                            capsys):
    """Older code left records in the outputs tree: one of a run whose committed record is
    current, one of a run with no committed record. Neither reaches the records."""
    page, table, out = tiny
    monkeypatch.setattr(P, "run_table", lambda *a, **k: pytest.fail("nothing fits: no run"))
    left = {}
    for row, seed in (("dense", 0), ("lowrank_fc", 1)):
        old = record(table, row, seed, 50.0, 600.0)
        old["config"]["epochs"] = 99  # composed differently then
        left[row] = run_dir("tiny", table.row(row), out, seed) / RESULTS
        left[row].parent.mkdir(parents=True)
        left[row].write_text(json.dumps(old))
    committed = Path(page.records) / "tiny" / "runs" / "svhn_table/dense" / "seed0" / RESULTS
    before = committed.read_bytes()
    assert P.build(page, out, hours=0.1) == 0
    assert committed.read_bytes() == before
    assert left["dense"].read_bytes() == before  # the committed record restored in its place
    assert [p.name.startswith("seed0.old-") for p in left["dense"].parent.parent.iterdir()
            ].count(True) == 1
    assert not (Path(page.records) / "tiny" / "runs" / "svhn_table/lowrank_fc" / "seed1"
                / RESULTS).exists()
    said = capsys.readouterr().out
    assert "dense seed 0: the outputs tree's record is stale (config changed (epochs))" in said
    assert "lowrank_fc seed 1: not kept (config changed (epochs); it runs again)" in said
    assert "| Dense | dense | 2 | 90.50 ± 0.71 |" in Path(page.page).read_text()


def test_a_section_title_replaces_the_tables_and_the_default_page_is_not_named(tiny, monkeypatch):
    page, table, out = tiny
    monkeypatch.setattr(P, "run_table", lambda *a, **k: pytest.fail("nothing fits: no run"))
    path = Path(page.page).parent.parent / "experiments" / "pages" / "results.yaml"
    spec = yaml.safe_load((path.parent / "tiny_page.yaml").read_text())
    spec["name"], spec["sections"][0]["title"] = "results", "Synthetic tiny (10 classes)"
    path.write_text(yaml.safe_dump(spec))
    titled = P.load_page(str(path))
    assert P.section_table(titled.sections[0], out)[0].title == "Synthetic tiny (10 classes)"
    P.build(titled, out, hours=0.1)
    text = Path(titled.page).read_text()
    assert "## Synthetic tiny (10 classes)\n" in text and "## Tiny table" not in text
    assert "Generated by `kron-tables results`; do not edit" in text
    assert "Ran (read from the run records): data synth_svhn" in text
    P.build(page, out, hours=0.1)  # a page of another name says its name
    assert "Generated by `kron-tables results tiny_page`;" in Path(page.page).read_text()
