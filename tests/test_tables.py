"""The table pipeline: declarations, rendering (exact Markdown/CSV), runs, plots, W&B, sweeps."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from kron.paths import CONFIG_DIR
from kron import measure
from kron.layers import KronConv2d, KronLinear
from kron.tables import render as R
from kron.tables.cli import main
from kron.tables.plots import pareto_front, plot_table
from kron.tables.results import collect, collect_wandb, run_dir
from kron.tables.run import check_overrides, multirun_command, pending, run_table, set_aside
from kron.tables.spec import load_table, table_from_dict
from kron.tables.sweep import compose_base, enumerate_points, within_budget, write_sweep

CONFIGS = CONFIG_DIR

DECL = {
    "name": "toy",
    "title": "Toy table",
    "paper": "nowhere",
    "reference": "dense",
    "overrides": ["data=synth_svhn"],
    "reconstruction": ["A hand-written fixture."],
    "rows": [
        {"id": "dense", "experiment": "toy_table/dense", "label": "Dense", "family": "dense"},
        {"id": "kron_a", "experiment": "toy_table/kron_a", "label": "Kron A", "family": "kron"},
        {"id": "kron_b", "experiment": "toy_table/kron_b", "label": "Kron B", "family": "kron"},
        {"id": "lowrank", "experiment": "toy_table/lowrank", "label": "Low-rank",
         "family": "lowrank"},
        {"id": "large", "experiment": "toy_table/large", "label": "Large maps",
         "family": "kron"},
    ],
}


def result(acc, params, macs, speedup, done=2, epochs=2, row="dense"):
    return {"test_acc1": acc, "params": params, "params_dense": 1_000_000, "macs": macs,
            "macs_dense": 20_000_000, "speedup": speedup, "latency_ms": 10.0 / speedup,
            "latency_dense_ms": 10.0, "epochs_done": done, "config": {"epochs": epochs},
            "overrides": [f"experiment=toy_table/{row}", "data=synth_svhn"]}


@pytest.fixture
def toy(tmp_path):
    """The toy table with hand-written results: two complete rows, one run stopped after 1 of 2
    epochs, one folder without results.json (failed) and one row never run (missing)."""
    table = table_from_dict(DECL)
    runs = {"dense": result(92.5, 1_000_000, 20_000_000, 1.0),
            "kron_a": {**result(91.75, 250_000, 19_000_000, 3.2, row="kron_a"),  # auto: 19M ran
                       "surgery": [{"macs_before": 16_000_000, "macs_after": 1_000_000}]},
            "kron_b": result(90.0, 20_000, 1_000_000, 12.0, done=1, row="kron_b")}
    for row in table.rows:
        folder = run_dir(table.name, row, tmp_path)
        if row.id in runs:
            folder.mkdir(parents=True)
            (folder / "results.json").write_text(json.dumps(runs[row.id]))
        elif row.id == "lowrank":
            (folder / ".hydra").mkdir(parents=True)
    return table, tmp_path


EXPECTED_MD = """\
## Toy table

Paper: nowhere.

| Row | Family | Top-1 (%) | Error (%) | Δ error | Params | Param. red. | MACs | MAC red. | \
Speedup (measured) | Paper | Status |
|:--|:--|--:|--:|--:|--:|--:|--:|--:|--:|:--|:--|
| Dense | dense | 92.50 | 7.50 | ref | 1.00M | 1.00x | 20.00M | 1.00x | 1.00x | not stated | ok |
| Kron A | kron | 91.75 | 8.25 | +0.75 | 250.0K | 4.00x | 5.00M | 4.00x | 3.20x | not stated | ok |
| Kron B | kron | 90.00 | 10.00 | +2.50 | 20.0K | 50.0x | 1.00M | 20.0x | 12.0x | not stated | \
**incomplete** (1/2 epochs) |
| Low-rank | lowrank | – | – | – | – | – | – | – | – | not stated | **failed** |
| Large maps | kron | – | – | – | – | – | – | – | – | not stated | **missing** |

Param./MAC reduction and speedup are against each run's own dense twin (same net, no layer \
swapped), speedup measured in the same process; MACs are per image, of the factored layers \
(table.csv's macs_executed: what ran); Δ error is in points against the reference row (dense).

- Paper's headline: 3.3x speedup or 3.6x parameter reduction with less than 1% drop in accuracy \
(abstract; the experiment it refers to is not stated).
- Ours, among rows less than 1 point worse than dense: best measured speedup 3.20x (Kron A), \
best parameter reduction 4.00x (Kron A).

Not complete: kron_b (incomplete: 1/2 epochs); lowrank (failed: no results.json); large \
(missing: no run folder).

Reconstruction choices:

- A hand-written fixture.
"""

EXPECTED_CSV = """\
id,label,family,status,test_acc1,test_err1,delta_err,params,params_dense,param_reduction,macs,\
macs_dense,mac_reduction,macs_executed,speedup,latency_ms,latency_dense_ms,epochs_done,paper,run_dir
dense,Dense,dense,ok,92.5,7.5,0.0,1000000,1000000,1.0,20000000,20000000,1.0,20000000,1.0,10.0,10.0,\
2,not stated,runs/toy_table/dense
kron_a,Kron A,kron,ok,91.75,8.25,0.75,250000,1000000,4.0,5000000,20000000,4.0,19000000,3.2,3.125,\
10.0,2,not stated,runs/toy_table/kron_a
kron_b,Kron B,kron,incomplete,90.0,10.0,2.5,20000,1000000,50.0,1000000,20000000,20.0,1000000,12.0,\
0.8333,10.0,1,not stated,runs/toy_table/kron_b
lowrank,Low-rank,lowrank,failed,,,,,,,,,,,,,,,not stated,runs/toy_table/lowrank
large,Large maps,kron,missing,,,,,,,,,,,,,,,not stated,runs/toy_table/large
"""


def test_render_markdown_and_csv_exactly(toy):
    table, out = toy
    results = collect(table, out)
    assert [r.status for r in results] == ["ok", "ok", "incomplete", "failed", "missing"]
    assert R.to_markdown(table, results) == EXPECTED_MD
    assert R.to_csv(table, results, base=out / "tables" / "toy") == EXPECTED_CSV


def test_missing_and_failed_rows_are_marked_not_dropped(toy):
    table, out = toy
    tex = R.to_latex(table, collect(table, out))
    assert tex.count(r"\\") == 1 + len(table.rows)  # header + every row, the missing included
    assert r"\textit{missing}" in tex and r"\textit{failed}" in tex
    assert r"4.00$\times$" in tex and r"$\Delta$ error" in tex


def test_unreadable_or_partial_results_are_failed(tmp_path):
    table = table_from_dict(DECL)
    bad = run_dir("toy", table.row("dense"), tmp_path)
    bad.mkdir(parents=True)
    (bad / "results.json").write_text("{not json")
    part = run_dir("toy", table.row("kron_a"), tmp_path)
    part.mkdir(parents=True)
    (part / "results.json").write_text(json.dumps({"test_acc1": 50.0}))
    res = {r.row.id: r for r in collect(table, tmp_path)}
    assert res["dense"].status == "failed" and "unreadable" in res["dense"].reason
    assert res["kron_a"].status == "failed" and "params" in res["kron_a"].reason
    md = R.to_markdown(table, list(res.values()))
    assert "no result for the reference row" in md


def test_cli_render_writes_every_output(toy, monkeypatch, capsys):
    table, out = toy
    exp = out / "experiments"
    exp.mkdir()
    (exp / "toy.yaml").write_text(json.dumps(DECL))  # JSON is YAML
    monkeypatch.setenv("KRON_EXPERIMENTS", str(exp))
    assert main(["render", "toy", "--out", str(out)]) == 0
    folder = out / "tables" / "toy"
    assert (folder / "table.md").read_text() == EXPECTED_MD
    assert (folder / "table.csv").read_text() == EXPECTED_CSV
    for name in ("table.tex", "error_vs_params.png", "error_vs_params.pdf",
                 "error_vs_speedup.png", "error_vs_speedup.pdf"):
        assert (folder / name).stat().st_size > 0, name
    assert not list(folder.glob(".*.tmp"))
    assert "| Kron A |" in capsys.readouterr().out
    assert main(["render", "nope", "--out", str(out)]) == 2  # one-line error, no traceback


def test_pareto_front():
    pts = [(1.0, 10.0), (2.0, 8.0), (3.0, 9.0), (4.0, 5.0), (4.0, 6.0), (0.5, 12.0)]
    assert pareto_front(pts) == [5, 0, 1, 3]  # fewer params and lower error are better
    # larger x is better: (4, 5) dominates all but itself
    assert pareto_front(pts, maximize_x=True) == [3]
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)]) == [0, 1]  # ties are both kept


def test_plots_without_any_result(tmp_path):
    rows = [{"id": "a", "family": "kron", "params": None, "speedup": None, "test_err1": None}]
    paths = plot_table(rows, tmp_path, "empty")
    assert len(paths) == 4 and all(p.stat().st_size > 0 for p in paths)


def test_paper_cell_says_not_stated_unless_given():
    assert R.paper_cell({}) == "not stated"
    # format check only (not a paper number): a stated value is shown with its unit
    assert R.paper_cell({"speedup": 2.0, "error": 5.0}) == "error 5.0%, 2.0x speedup"
    with pytest.raises(ValueError, match="paper keys"):
        table_from_dict({**DECL, "rows": [{"id": "x", "experiment": "e", "paper": {"bleu": 1}}]})


def test_declarations_reject_bad_input():
    with pytest.raises(ValueError, match="reference 'nope' is not a row id"):
        table_from_dict({**DECL, "reference": "nope"})
    with pytest.raises(ValueError, match="family must be one of"):
        table_from_dict({**DECL, "rows": [{"id": "x", "experiment": "e", "family": "sparse"}]})
    with pytest.raises(ValueError, match="duplicate row ids"):
        table_from_dict({**DECL, "rows": [DECL["rows"][0], DECL["rows"][0]]})
    with pytest.raises(ValueError, match="no table 'nope'"):
        load_table("nope")


# ----------------------------------------------------------------------------- launching
def test_run_skips_rows_with_results_unless_redo(toy, capsys):
    table, out = toy
    todo, skipped = pending(table, table.rows, out, redo=False)
    assert [r.id for r in skipped] == ["dense", "kron_a", "kron_b"]
    assert [r.id for r in todo] == ["lowrank", "large"]
    todo, skipped = pending(table, table.rows, out, redo=True)
    assert len(todo) == 5 and not skipped
    assert run_table(table, out=out, dry_run=True) == 0
    printed = capsys.readouterr().out
    assert "skip dense" in printed and "experiment=toy_table/lowrank,toy_table/large" in printed
    assert run_table(table, rows=["dense"], out=out) == 0  # all done: nothing launched
    assert "nothing to run" in capsys.readouterr().out
    # results made with other overrides (an edited table, or extra overrides) are stale
    todo, skipped = pending(table, table.rows[:3], out, redo=False, extra=["epochs=9"])
    assert [r.id for r in todo] == ["dense", "kron_a", "kron_b"] and not skipped
    # the same overrides in another spelling (Hydra saves booleans as True/False) are not stale
    res = out / "tables/toy/runs/toy_table/dense/results.json"
    res.write_text(json.dumps({**json.loads(res.read_text()), "overrides": [
        "experiment=toy_table/dense", "data=synth_svhn", "progress=False"]}))
    todo, skipped = pending(table, table.rows[:1], out, False, extra=["progress=false"])
    assert not todo and skipped == [table.rows[0]]
    # a repeated key counts once (the last value wins, as in Hydra); the launcher is ignored
    todo, skipped = pending(table, table.rows[:1], out, False,
                            extra=["progress=true", "progress=false"], launcher="joblib")
    assert not todo


def test_multirun_command(toy):
    table, out = toy
    cmd = multirun_command(table, table.rows[:2], out, launcher="joblib", extra=["epochs=1"])
    assert cmd[1:5] == ["-c", "from kron.train import main; main()", "-m",
                        "experiment=toy_table/dense,toy_table/kron_a"]
    assert "data=synth_svhn" in cmd and "epochs=1" in cmd and "launcher=joblib" in cmd
    assert f"hydra.sweep.dir={(out / 'tables' / 'toy' / 'runs').resolve()}" in cmd
    assert "hydra.sweep.subdir=${hydra:runtime.choices.experiment}" in cmd
    for bad in ("seed=0,1", "experiment=x", "lr=glob(*)", "hydra.sweep.dir=x"):
        with pytest.raises(ValueError):
            check_overrides([bad])
    check_overrides(["+data.transforms.train.resize=[64,64]", "hydra.searchpath=[file:///x]"])
    with pytest.raises(ValueError, match="launcher"):
        multirun_command(table, table.rows, out, launcher="pbs")
    with pytest.raises(KeyError, match="no row 'zz'"):
        run_table(table, rows=["zz"], out=out, dry_run=True)


def test_set_aside_keeps_the_old_run(toy):
    table, out = toy
    folder = run_dir("toy", table.row("dense"), out)
    moved = set_aside(folder)
    assert not folder.exists() and (moved / "results.json").is_file()
    assert moved.name.startswith("dense.old-")


def test_collect_from_wandb_api():
    table = table_from_dict(DECL)

    def run(name, state, created, acc):
        summary = {**result(acc, 500_000, 10_000_000, 2.0), "_step": 3}
        summary.pop("config")
        return SimpleNamespace(config={"wandb": {"name": name}, "epochs": 2}, name="x",
                               state=state, created_at=created, summary=summary)

    runs = [run("toy_table/dense", "finished", "2024-01-01", 90.0),
            run("toy_table/dense", "finished", "2024-02-01", 91.0),  # newest finished wins
            run("toy_table/dense", "crashed", "2024-03-01", 10.0),
            run("toy_table/kron_a", "finished", "2024-01-01", 89.0)]
    api = SimpleNamespace(runs=lambda project: runs)
    res = {r.row.id: r for r in collect_wandb(table, "me/kron", api=api)}
    assert res["dense"].status == "ok" and res["dense"].data["test_acc1"] == 91.0
    assert res["kron_a"].status == "ok" and res["large"].status == "missing"
    assert "_step" not in res["dense"].data


# ----------------------------------------------------------------------------- sweeps
def brute_force(dims, dense_macs, macs_of, rank, param_ratio, mac_ratio):
    """Every A shape by trying every integer per axis (no divisor helper), filtered by budget."""
    out = set()
    for a in itertools.product(*(range(1, d + 1) for d in dims)):
        if any(d % s for d, s in zip(dims, a)):
            continue
        b = tuple(d // s for d, s in zip(dims, a))
        if math.prod(a) == 1 or math.prod(b) == 1 or rank > min(math.prod(a), math.prod(b)):
            continue
        params = rank * (math.prod(a) + math.prod(b))
        if params / math.prod(dims) > param_ratio:
            continue
        if mac_ratio is not None and macs_of(a, rank) / dense_macs > mac_ratio:
            continue
        out.add(a)
    return out


@pytest.mark.parametrize("rank,param_ratio,mac_ratio", [(1, 0.5, None), (1, 0.6, 0.5),
                                                         (2, 0.8, 0.9)])
def test_sweep_linear_shapes_match_brute_force(rank, param_ratio, mac_ratio):
    layer = nn.Linear(12, 8)
    x = (1, 12)

    def macs_of(a, r):  # what really executes, counted by FlopCounterMode
        return measure.count_macs(KronLinear(12, 8, [a] * r, bias=False,
                                             implementation="factored"), x)

    want = brute_force((8, 12), 96, macs_of, rank, param_ratio, mac_ratio)
    got = {f.a_shape for f in within_budget(layer, rank=rank, param_ratio=param_ratio,
                                            mac_ratio=mac_ratio)}
    assert got == want and want


def test_sweep_conv_shapes_match_brute_force():
    layer = nn.Conv2d(4, 6, 3, padding=1)
    x = (1, 4, 5, 5)
    dense = measure.count_macs(nn.Conv2d(4, 6, 3, padding=1, bias=False), x)

    def macs_of(a, r):
        return measure.count_macs(KronConv2d(4, 6, 3, [a] * r, padding=1, bias=False,
                                             implementation="factored"), x)

    want = brute_force((6, 4, 3, 3), dense, macs_of, 1, 0.4, 0.6)
    got = {f.a_shape for f in within_budget(layer, (5, 5), param_ratio=0.4, mac_ratio=0.6)}
    assert got == want and len(want) > 5
    with pytest.raises(ValueError, match="needs its input size"):
        within_budget(layer, None, mac_ratio=0.5)
    with pytest.raises(ValueError, match="needs a budget"):
        within_budget(layer, (5, 5))


def test_sweep_writes_runnable_experiments(tmp_path):
    over = ["layers=svhn_kron", "model.width=0.25"]
    cfg = compose_base(over)
    points = enumerate_points(cfg, ["classifier.fc2"], param_ratio=0.02)
    fc2 = nn.Linear(512, 512)
    assert {p.shape.a_shape for p in points} == {
        f.a_shape for f in within_budget(fc2, param_ratio=0.02)}
    table = write_sweep("t", cfg, points, over, out=tmp_path, budget="param ratio <= 0.02")
    assert table.rows[0].id == "base" and len(table.rows) == len(points) + 1
    assert not any(o.startswith("layers=") for o in table.overrides)
    p = points[0]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        got = compose("train", overrides=[f"experiment={table.row(p.id).experiment}",
                                          *table.overrides])
    spec = dict(got.layers)
    assert list(spec)[-1] == "classifier.fc2"  # last: wins over any glob of the base spec
    assert [list(t) for t in spec["classifier.fc2"]["terms"]] == [list(p.shape.a_shape)]
    assert spec["features.conv2"] == cfg.layers["features.conv2"]  # the rest as configured
    with pytest.raises(ValueError, match="matches no Linear/Conv2d"):
        enumerate_points(cfg, ["classifier.fc9"], param_ratio=0.1)
    with pytest.raises(ValueError, match="generates its own experiments"):
        compose_base(["experiment=svhn_dense"])


def test_sweep_cli_dry_run(tmp_path, capsys):
    code = main(["sweep", "fc2", "--out", str(tmp_path), "--layer", "classifier.fc2",
                 "--param-ratio", "0.01", "--dry-run", "layers=dense", "model.width=0.25",
                 "--max-points", "100"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "shape(s) within param ratio <= 0.01" in printed and "main()' -m" in printed
    assert (tmp_path / "tables" / "sweep_fc2" / "table.yaml").is_file()


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_atomic_write_gives_ordinary_permissions(tmp_path):
    import os

    from kron.fileio import atomic_write_text

    p = atomic_write_text(tmp_path / "a" / "t.md", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert p.read_text() == "x" and (p.stat().st_mode & 0o777) == (0o666 & ~umask)
    assert [q.name for q in p.parent.iterdir()] == ["t.md"]


def test_results_from_an_edited_experiment_config_are_stale(tmp_path):
    """Same overrides, but the config they compose to changed since the run: rerun it."""
    import json

    from kron.tables.results import RESULTS, run_dir
    from kron.tables.run import composed_config, stale
    from kron.tables.spec import load_table

    table = load_table("svhn_demo")
    row = table.rows[0]
    folder = run_dir(table.name, row, tmp_path)
    folder.mkdir(parents=True)
    from kron.tables.run import job_overrides

    want = job_overrides(table, row)
    config = composed_config(want)
    assert config is not None
    (folder / RESULTS).write_text(json.dumps({"overrides": want, "config": config}))
    assert not stale(table, row, tmp_path)
    config["grad_clip"] = 123.0  # as if _base.yaml had been edited after the run
    (folder / RESULTS).write_text(json.dumps({"overrides": want, "config": config}))
    assert stale(table, row, tmp_path)
