"""kron-tables frontier: each family at matched budgets (generated configs, feasibility, the
best family per budget), and (slow) a tiny frontier trained for real and rendered."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from kron.config_compose import compose_train
from kron.models.surgery import apply_surgery
from kron.tables import render as R
from kron.tables.aggregate import Stat
from kron.tables.cli import find_table, main
from kron.tables.frontier import (
    FAMILY_KINDS,
    KRON_SHAPE_RULE,
    base_config,
    base_overrides,
    best_per_budget,
    family_spec,
    feasible,
    frontier_markdown,
    point_id,
    swappable,
    write_frontier,
)
from kron.tables.results import collect

SMALL = ["model.width=0.25"]


def test_families_replace_every_swappable_layer_at_the_budget(tmp_path):
    name, over, exp = base_overrides("svhn", SMALL)
    assert (name, exp) == ("svhn", "svhn_table/dense")
    cfg = base_config(over, exp)
    layers = swappable(cfg)
    assert list(layers) == ["features.conv2", "features.conv3", "features.conv4",
                            "features.conv5", "classifier.fc1", "classifier.fc2"]
    for family, (conv_kind, linear_kind) in FAMILY_KINDS.items():
        spec = family_spec(family, layers, "param_ratio", 0.1)
        kinds = {n: e["kind"] for n, e in spec.items()}
        assert kinds == {n: (linear_kind if n.startswith("classifier") else conv_kind)
                         for n in layers if (linear_kind if n.startswith("classifier")
                                             else conv_kind)}
        assert feasible(cfg, spec) is None, family
    from kron.models import build_model_from_config

    net = build_model_from_config(cfg.model, 10, 3, 32)
    rows = apply_surgery(net, family_spec("kron", layers, "param_ratio", 0.1), (1, 3, 32, 32))
    assert all(r.params_after <= 0.1 * (r.params_before) + 1e-9 + 64 for r in rows)
    # a budget below every shape's smallest ratio is refused with the surgery's reason
    why = feasible(cfg, family_spec("kron", layers, "param_ratio", 1e-6))
    assert why is not None and "param_ratio" in why
    with pytest.raises(ValueError, match="unknown family"):
        family_spec("sparse", layers, "param_ratio", 0.1)
    # the Kronecker shape rule is part of the spec (a record made under another rule is
    # stale), on the Kronecker entries only
    assert {e["shape_rule"] for e in family_spec("kron", layers, "param_ratio", 0.1).values()} \
        == {KRON_SHAPE_RULE}
    ruled = family_spec("kron", layers, "param_ratio", 0.1, "most_params")
    assert {e["shape_rule"] for e in ruled.values()} == {"most_params"}
    assert all("shape_rule" not in e
               for e in family_spec("tucker", layers, "param_ratio", 0.1).values())
    square = {r.name: r.detail for r in apply_surgery(
        build_model_from_config(cfg.model, 10, 3, 32),
        family_spec("kron", layers, "param_ratio", 0.1), (1, 3, 32, 32))}
    assert all(d.endswith("x1x1") for n, d in square.items() if "conv" in n), square
    with pytest.raises(ValueError, match="neither a table"):
        base_overrides("nope", [])
    with pytest.raises(ValueError, match="sets the preset and layers"):
        base_overrides("svhn", ["layers=dense"])
    assert point_id("kron", "param_ratio", 0.05) == "kron_p0_05"
    assert point_id("cp", "mac_ratio", 0.2) == "cp_m0_2"


def test_write_frontier_configs_compose(tmp_path):
    table, skipped = write_frontier("svhn", ["kron", "cp"], [0.2, 1e-6], "param_ratio", SMALL,
                                    None, tmp_path, seeds=2)
    ids = [r.id for r in table.rows]
    assert ids == ["dense", "kron_p0_2", "cp_p0_2"]  # 1e-6 fits neither family: left out
    assert [s.split(":")[0] for s in skipped] == ["kron_p1e_06", "cp_p1e_06"]
    assert "param_ratio" in skipped[0]  # the surgery's own reason
    assert table.seeds == 2 and table.reference == "dense" and not table.headline
    assert table.row("kron_p0_2").budget == 0.2 and table.row("dense").budget is None
    cfg = compose_train([f"preset={table.row('cp_p0_2').preset}", *table.overrides])
    spec = OmegaConf.to_container(cfg.layers, resolve=True)
    assert spec["features.conv3"] == {"kind": "cp", "param_ratio": 0.2}
    assert spec["classifier.fc1"] == {"kind": "lowrank", "param_ratio": 0.2}
    assert cfg.wandb.name == "frontier_svhn/cp_p0_2" and cfg.model.width == 0.25
    assert cfg.grad_clip == 2.0  # the rest of the svhn table's recipe (svhn_table/_base)
    with pytest.raises(ValueError, match="no family fits any budget"):
        write_frontier("svhn", ["kron"], [1e-6], "param_ratio", SMALL, None, tmp_path)


def test_frontier_on_a_model_config_and_cli_dry_run(tmp_path, capsys):
    code = main(["frontier", "resnet", "--families", "kron,lowrank", "--param-ratios",
                 "0.1", "--seeds", "2", "--out", str(tmp_path), "--dry-run", "data=synth_svhn"])
    assert code == 0
    printed = capsys.readouterr().out
    # resnet18's only Linear is its output layer, which stays dense: no low-rank point
    assert "left out lowrank_p0_1: no layer of this family to replace" in printed
    assert "frontier frontier_resnet: 2 rows x 2 seed(s) = 4 runs" in printed
    assert " seed=0,1 model=resnet data=synth_svhn " in printed
    assert main(["frontier", "svhn", "--out", str(tmp_path)]) == 2  # no budget: one line
    assert main(["frontier", "svhn", "--param-ratios", "0.1,x", "--out", str(tmp_path)]) == 2
    assert main(["frontier", "svhn", "--param-ratios", "0.1,0.2", "--max-runs", "3",
                 "--out", str(tmp_path), "model.width=0.25"]) == 2


def _row(rid, family, budget, errs, params=1000):
    return {"id": rid, "family": family, "budget": budget, "test_err1": Stat.of(errs),
            "params": Stat.of([params]), "speedup": Stat.of([2.0])}


def test_best_family_per_budget_and_its_lead():
    rows = [_row("dense", "dense", None, [5.0, 5.2]),
            _row("k1", "kron", 0.1, [6.0, 6.2]), _row("l1", "lowrank", 0.1, [7.0, 7.4]),
            _row("k2", "kron", 0.2, [5.5, 6.5]), _row("l2", "lowrank", 0.2, [5.4, 6.0]),
            _row("c3", "cp", 0.3, [5.1])]
    got = best_per_budget(rows)
    assert [(p["budget"], p["best"]["id"], p["second"] and p["second"]["id"]) for p in got] == [
        (0.1, "k1", "l1"), (0.2, "l2", "k2"), (0.3, "c3", None)]
    assert got[0]["lead"] == pytest.approx(1.1) and got[0]["separated"]  # 6.1±.14 vs 7.2±.28
    assert got[1]["lead"] == pytest.approx(0.3) and not got[1]["separated"]
    md = frontier_markdown(type("T", (), {"title": "F"})(), rows)
    assert "| 0.1 | kron | 6.10 ± 0.14 | 1.0K | lowrank | 7.20 ± 0.28 | 1.10 | yes |" in md
    assert "| 0.2 | lowrank | 5.70 ± 0.42 | 1.0K | kron | 6.00 ± 0.71 | 0.30 | no |" in md
    assert "| 0.3 | cp | 5.10 | 1.0K | – | – | – | only one family |" in md


def test_frontier_plot_has_one_line_per_family():
    from kron.tables.plots import frontier_figure
    from tests.test_tables import errorbars

    rows = [_row("dense", "dense", None, [5.0, 5.2]),
            _row("k1", "kron", 0.1, [6.0, 6.2], 100), _row("k2", "kron", 0.2, [5.5, 6.5], 200),
            _row("l1", "lowrank", 0.1, [7.0, 7.4], 300)]
    fig = frontier_figure(rows, "params", title="t", xlabel="p", log_x=True, vline=False)
    bars = errorbars(fig)
    assert set(bars) == {"Kronecker", "low-rank"}
    x, y, yerr, _ = bars["Kronecker"]
    assert x == [100.0, 200.0] and y == pytest.approx([6.1, 6.0])
    assert yerr == pytest.approx([0.1414, 0.7071], abs=1e-4)
    dense = [ln for ln in fig.axes[0].lines if ln.get_label().startswith("dense")]
    assert len(dense) == 1 and dense[0].get_ydata()[0] == pytest.approx(5.1)


@pytest.mark.slow
def test_tiny_frontier_trains_and_renders(tmp_path, monkeypatch):
    """Real runs (kron.train as a Hydra multirun): 2 families x 1 budget x 2 seeds + dense."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    over = ["data=synth_svhn", "model.width=0.125", f"data.root={tmp_path / 'data'}",
            "data.synth.n_train=32",
            "data.synth.n_test=16", "data.loader.num_workers=0", "batch_size=16", "epochs=1",
            "measure.repeats=2", "measure.warmup=1", "measure.batch_size=4", "progress=false",
            "threads=1", "wandb.mode=disabled"]
    code = main(["frontier", "svhn", "--families", "kron,tucker", "--param-ratios", "0.2",
                 "--seeds", "2", "--out", str(tmp_path), *over])
    assert code == 0
    folder = tmp_path / "tables" / "frontier_svhn"
    csv = (folder / "table.csv").read_text().splitlines()
    assert [line.split(",")[3:6] for line in csv[1:]] == [["ok", "2", "2"]] * 3
    md = (folder / "table.md").read_text()
    assert "best family per budget" in md and "| 0.2 |" in md
    for name in ("frontier_params.png", "frontier_speedup.png", "error_vs_params.png"):
        assert (folder / name).stat().st_size > 0
    results = json.loads(next(folder.glob("runs/frontier_svhn/kron_p0_2/seed1/results.json"))
                         .read_text())
    assert results["config"]["seed"] == 1
    assert results["param_ratio"] < 0.5
    table = find_table("frontier_svhn", tmp_path)
    rows = R.metrics(collect(table, tmp_path), "dense")
    assert [m["test_err1"].n for m in rows] == [2, 2, 2]
    assert {m["family"] for m in rows} == {"dense", "kron", "tucker"}


def test_the_kron_shape_rule_option_reaches_the_generated_presets(tmp_path, capsys):
    args = ["frontier", "svhn", "--families", "kron", "--param-ratios", "0.1", "--dry-run",
            "--out", str(tmp_path), "model.width=0.25"]
    assert main([*args, "--kron-shape-rule", "most_params"]) == 0
    preset, = (tmp_path / "tables" / "frontier_svhn").rglob("kron_p0_1.yaml")
    assert preset.read_text().count("shape_rule: most_params") == 6
    assert main(args) == 0  # the default rule
    assert preset.read_text().count(f"shape_rule: {KRON_SHAPE_RULE}") == 6
    with pytest.raises(SystemExit):
        main([*args, "--kron-shape-rule", "biggest"])
    assert "invalid choice: 'biggest'" in capsys.readouterr().err
