"""Seeds and aggregation on results written by real short runs of kron.train (slow: each run
trains a tiny net for one or two epochs), and `render --wandb` on the same runs' W&B offline
logs: the two sources give the same table."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from kron.config_compose import compose_train
from kron.tables import render as R
from kron.tables.aggregate import ROW_STATUSES
from kron.tables.plots import tradeoff_figure
from kron.tables.results import collect, collect_wandb, run_dir, runs_dir
from kron.tables.run import job_overrides
from kron.tables.spec import table_from_dict
from kron.tables.wandb_offline import OfflineRuns, records

pytestmark = pytest.mark.slow

DECL = {
    "name": "real", "title": "Real tiny runs", "reference": "dense", "seeds": 2,
    "rows": [
        {"id": "dense", "preset": "svhn_table/dense", "family": "dense"},
        {"id": "kron", "preset": "svhn_table/kron_c16", "family": "kron"},
        {"id": "lowrank", "preset": "svhn_table/lowrank_fc", "family": "lowrank"},
        {"id": "stopped", "preset": "svhn_table/kron_fc", "family": "kron"},
        {"id": "broken", "preset": "svhn_table/cp", "family": "lowrank"},
        {"id": "never", "preset": "svhn_table/tucker", "family": "lowrank"},
    ],
}


def tiny(root) -> list[str]:
    return ["data=synth_svhn", f"data.root={root}", "data.synth.n_train=48",
            "data.synth.n_test=32", "data.loader.num_workers=0", "model.width=0.125",
            "batch_size=16", "eval_batch_size=32", "epochs=1", "measure.repeats=3",
            "measure.warmup=1", "measure.batch_size=4", "progress=false", "threads=1",
            "wandb.mode=offline", "scheduler.warmup_steps=1"]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """dense and kron: seeds 0 and 1; lowrank: seed 0 only (partial); stopped: killed after
    epoch 1 of 2 (incomplete); broken: crashes before training (failed); never: not run."""
    from kron.train import train

    out = tmp_path_factory.mktemp("real")
    table = table_from_dict({**DECL, "overrides": tiny(out / "data")})

    def run(row_id, seed, extra=()):
        row = table.row(row_id)
        over = [*job_overrides(table, row, seed=seed), *extra]
        cfg = compose_train(over)
        return train(cfg, run_dir(table.name, row, out, seed), over)

    for row_id, seed in (("dense", 0), ("dense", 1), ("kron", 0), ("kron", 1), ("lowrank", 0)):
        run(row_id, seed)
    run("stopped", 0, ["epochs=2", "stop_after_epochs=1"])
    with pytest.raises(ValueError, match="exceeds"):  # batch 16 > 8 images: crashes at start
        run("broken", 0, [f"data.root={out / 'data8'}", "data.synth.n_train=8"])
    return table, out


def saved(table, out, row, seed):
    return json.loads((run_dir(table.name, table.row(row), out, seed) / "results.json")
                      .read_text())


def test_every_row_status_from_real_runs(real):
    table, out = real
    rows = {m["id"]: m for m in R.metrics(collect(table, out), "dense")}
    assert {k: m["status"] for k, m in rows.items()} == {
        "dense": "ok", "kron": "ok", "lowrank": "partial", "stopped": "incomplete",
        "broken": "failed", "never": "missing"}
    assert set(m["status"] for m in rows.values()) == set(ROW_STATUSES)
    assert rows["lowrank"]["reason"] == "1/2 seeds (seed 1 missing: not run)"
    assert "seed 0 incomplete: stopped after 1/2 epochs" in rows["stopped"]["reason"]


def test_aggregation_of_real_runs(real):
    table, out = real
    rows = {m["id"]: m for m in R.metrics(collect(table, out), "dense")}
    d = [saved(table, out, "dense", s) for s in (0, 1)]
    k = [saved(table, out, "kron", s) for s in (0, 1)]
    assert d[0]["config"]["seed"] == 0 and d[1]["config"]["seed"] == 1
    acc = [r["test_acc1"] for r in k]
    assert rows["kron"]["test_acc1"].mean == pytest.approx(statistics.mean(acc))
    assert rows["kron"]["test_acc1"].std == pytest.approx(statistics.stdev(acc))
    deltas = [(100 - k[s]["test_acc1"]) - (100 - d[s]["test_acc1"]) for s in (0, 1)]
    assert rows["kron"]["delta_err"].mean == pytest.approx(statistics.mean(deltas))
    assert rows["kron"]["delta_err"].std == pytest.approx(statistics.stdev(deltas))
    speed = [r["speedup"] for r in k]
    assert rows["kron"]["speedup"].std == pytest.approx(statistics.stdev(speed))
    assert rows["kron"]["params"].mean == k[0]["params"] == k[1]["params"]
    assert rows["kron"]["macs_analytic"].mean == k[0]["macs_analytic"]
    assert rows["kron"]["param_reduction"].mean == pytest.approx(
        k[0]["params_dense"] / k[0]["params"])
    md = R.to_markdown(table, collect(table, out))
    line = next(ln for ln in md.splitlines() if ln.startswith("| kron |"))
    assert f"| {statistics.mean(acc):.2f} ± {statistics.stdev(acc):.2f} |" in line
    assert line.split(" | ")[2] == "2"  # n
    assert "| lowrank | lowrank | 1/2 |" in md and "**1/2 seeds**" in md
    # plots: one errorbar container per family with a result, the kron bars one std wide
    from tests.test_tables import errorbars

    fig = tradeoff_figure(list(rows.values()), "speedup", title="t", xlabel="x",
                          maximize_x=True, log_x=False)
    bars = errorbars(fig)
    assert set(bars) == {"dense", "Kronecker", "low-rank"}
    assert bars["Kronecker"][2] == pytest.approx([statistics.stdev(100 - a for a in acc)],
                                                 abs=1e-9)
    assert bars["Kronecker"][3] == pytest.approx([statistics.stdev(speed)], abs=1e-9)


def test_render_from_wandb_offline_runs_equals_render_from_results(real):
    """The W&B offline logs of the same runs, replayed without a server, give the same
    table (the failed row aside: a crash before the W&B run starts leaves no W&B run)."""
    table, out = real
    wandb_files = sorted(runs_dir(table.name, out).rglob("run-*.wandb"))
    assert len(wandb_files) == 6  # five finished runs and the stopped one
    assert all(records(f) for f in wandb_files)
    api = OfflineRuns(runs_dir(table.name, out))
    shown = table_from_dict({**DECL, "rows": [r for r in DECL["rows"] if r["id"] != "broken"]})
    local = collect(shown, out)
    remote = collect_wandb(shown, "kron", api)
    assert [(r.row.id, r.seed, r.status) for r in remote] == \
        [(r.row.id, r.seed, r.status) for r in local]
    for a, b in zip(local, remote):
        if a.ok:  # every number of results.json is in the summary, surgery included
            for key in ("test_acc1", "params", "macs_analytic", "macs_executed", "speedup"):
                assert b.data[key] == pytest.approx(a.data[key]), key
    assert R.to_markdown(shown, remote) == R.to_markdown(shown, local)
    assert R.to_csv(shown, remote).replace(",,", ",") != ""  # renders
    stopped = [r for r in remote if r.row.id == "stopped" and r.seed == 0][0]
    assert stopped.reason == "stopped after 1/2 epochs"
    assert math.isfinite(remote[0].data["test_acc1"])
