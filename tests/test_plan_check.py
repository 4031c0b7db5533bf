"""A record whose config is unchanged but whose layers today's code would build otherwise (a
changed shape rule or rank search) is stale (kron/tables/plan_check.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kron.config_compose import compose_train
from kron.tables import plan_check
from kron.tables.plan_check import layers_changed, planned_layers
from kron.tables.results import RESULTS, run_dir
from kron.tables.run import stale
from kron.tables.spec import load_table

OLD_RECORD = json.loads((Path(__file__).parent / "data" / "results_before_names_v1.json")
                        .read_text())


def _place(table, row_id: str, out: Path, record: dict) -> None:
    path = run_dir(table.name, table.row(row_id), out, 0) / RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_a_record_whose_layers_differ_from_todays_plan_is_stale(tmp_path):
    table = load_table("svhn_demo")
    row = table.row("kron_c32x16")
    _place(table, "kron_c32x16", tmp_path, OLD_RECORD)
    assert not stale(table, row, tmp_path)  # its layers are what its config builds today
    record = json.loads(json.dumps(OLD_RECORD))
    conv = next(r for r in record["surgery"] if r["kind"] == "kron")
    conv["detail"] = "terms 16x16x1x1"  # made by code that chose another shape
    _place(table, "kron_c32x16", tmp_path, record)
    assert stale(table, row, tmp_path) == ("layers changed (today's code builds other shapes "
                                           "for this config)")
    del record["surgery"]  # a record without surgery rows is not judged by them
    _place(table, "kron_c32x16", tmp_path, record)
    assert not stale(table, row, tmp_path)


def test_a_changed_shape_rule_in_code_makes_a_budget_rows_record_stale(monkeypatch):
    cfg = OmegaConf.to_container(compose_train(["preset=svhn_table/kron_m10",
                                                "model.width=0.25"]), resolve=True)
    plan_check._planned.cache_clear()
    rows = planned_layers(cfg)
    assert rows and all(kind == "kron" for _, kind, _, _ in rows)
    recorded = [{"name": n, "kind": k, "detail": d, "status": s} for n, k, d, s in rows]
    assert not layers_changed(cfg, recorded)
    # the same config under code whose rule prefers the smallest shapes instead
    import kron.layers.shapes as shapes

    original = shapes.preferred
    monkeypatch.setattr(shapes, "preferred", lambda c, r="most_params": original(c, r)[::-1])
    plan_check._planned.cache_clear()
    try:
        assert layers_changed(cfg, recorded)
    finally:
        plan_check._planned.cache_clear()


@pytest.mark.parametrize("recorded", [None, "rows", [{"name": "x"}]])
def test_records_without_usable_rows_are_not_judged(recorded):
    cfg = OmegaConf.to_container(compose_train(["preset=svhn_table/kron_m10",
                                                "model.width=0.25"]), resolve=True)
    assert not layers_changed(cfg, recorded)


def test_stale_says_why(tmp_path):
    table = load_table("svhn_demo")
    row = table.row("kron_c32x16")
    record = json.loads(json.dumps(OLD_RECORD))
    record["config"]["epochs"] = 6
    _place(table, "kron_c32x16", tmp_path, record)
    assert stale(table, row, tmp_path) == "config changed (epochs)"
    record["config"]["optimizer"]["lr"] = 0.5
    _place(table, "kron_c32x16", tmp_path, record)
    assert stale(table, row, tmp_path) == "config changed (epochs)"  # the first, in config order
    record["overrides"][0] = "preset=svhn_table/kron_mixed"
    _place(table, "kron_c32x16", tmp_path, record)
    assert stale(table, row, tmp_path) == "overrides changed"
