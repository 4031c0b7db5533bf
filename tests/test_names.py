"""Renamed words (docs/notes/names.md) keep old run records current and readable.

``results_before_names_v1.json`` is a real results.json of the demo (row kron_c32x16, seed 0),
written before the renames: its overrides say ``experiment=...`` and its executed MACs sit under
``macs``. ``page_records_before_names_v1.json`` holds what the results page's SVHN runs recorded
at commit f9bb405 (their overrides and composed configs, as ``kron.train`` writes them).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kron.tables import render
from kron.tables.results import RESULTS, collect, run_dir
from kron.tables.run import check_overrides, stale
from kron.tables.spec import load_table, table_from_dict

DATA = Path(__file__).parent / "data"
OLD_RECORD = json.loads((DATA / "results_before_names_v1.json").read_text())
PAGE = json.loads((DATA / "page_records_before_names_v1.json").read_text())
#: the results page's overrides of its SVHN section (kron/experiments/pages/results.yaml)
PAGE_EXTRA = ["data=synth_svhn_hard", "model.width=1.0", "epochs=12", "batch_size=64",
              "eval_every=4", "progress=false"]


def _place(table, row_id: str, out: Path, record: dict, seed: int = 0) -> None:
    path = run_dir(table.name, table.row(row_id), out, seed) / RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_a_record_written_before_the_renames_is_not_stale(tmp_path):
    table = load_table("svhn_demo")
    assert OLD_RECORD["overrides"][0] == "experiment=svhn_table/kron_c32x16"
    _place(table, "kron_c32x16", tmp_path, OLD_RECORD)
    assert not stale(table, table.row("kron_c32x16"), tmp_path)


@pytest.mark.parametrize("row", ["dense", "kron_c16"])
def test_the_results_pages_records_are_not_stale(tmp_path, row):
    table = load_table("svhn")
    _place(table, row, tmp_path, PAGE[row])
    assert not stale(table, table.row(row), tmp_path, PAGE_EXTRA)
    # another value of a real override is a different run
    assert stale(table, table.row(row), tmp_path, [*PAGE_EXTRA, "epochs=13"])


@pytest.mark.parametrize("change", [
    lambda r: r["overrides"].__setitem__(0, "experiment=svhn_table/kron_mixed"),  # other row
    lambda r: r["overrides"].__setitem__(4, "epochs=6"),
    lambda r: r["config"].__setitem__("epochs", 6),  # the config composed then was other
    lambda r: r["config"].__setitem__("implementation", "factored"),
])
def test_an_old_record_of_another_run_is_stale(tmp_path, change):
    table = load_table("svhn_demo")
    record = json.loads(json.dumps(OLD_RECORD))
    change(record)
    _place(table, "kron_c32x16", tmp_path, record)
    assert stale(table, table.row("kron_c32x16"), tmp_path)


def test_the_old_implementation_name_compares_as_the_new_one(tmp_path):
    """``implementation=dense`` (the old name of ``composed``) in an old record's overrides and
    config is the same run as ``implementation=composed`` now."""
    table = load_table("svhn_demo")
    record = json.loads(json.dumps(OLD_RECORD))
    record["overrides"].append("implementation=dense")
    record["config"]["implementation"] = "dense"
    _place(table, "kron_c32x16", tmp_path, record)
    row = table.row("kron_c32x16")
    assert not stale(table, row, tmp_path, ["implementation=composed"])
    assert stale(table, row, tmp_path, ["implementation=factored"])


def test_an_old_record_renders_its_executed_and_analytic_macs(tmp_path):
    table = load_table("svhn_demo")
    _place(table, "kron_c32x16", tmp_path, OLD_RECORD)
    [res] = [r for r in collect(table, tmp_path, 1) if r.row.id == "kron_c32x16"]
    assert res.ok and "macs" not in res.data
    assert res.data["macs_executed"] == OLD_RECORD["macs"] == 11_393_024
    assert res.data["macs_analytic"] == OLD_RECORD["macs_analytic"] == 1_939_456
    runs = render.runs_csv([res]).splitlines()
    header = runs[0].split(",")
    line = dict(zip(header, runs[1].split(",")))
    assert (line["macs_analytic"], line["macs_executed"]) == ("1939456", "11393024")
    rows = dict(zip(render.CSV_FIELDS, render.to_csv(table, [res]).splitlines()[1].split(",")))
    assert float(rows["macs_analytic"]) == 1_939_456
    assert float(rows["macs_executed"]) == 11_393_024
    # the CSV keeps 6 significant digits
    assert float(rows["mac_reduction"]) == pytest.approx(29_415_424 / 1_939_456, rel=1e-5)
    assert "| 1.94M | 15.2x |" in render.to_markdown(table, [res])


def test_a_record_with_both_names_keeps_the_new_one(tmp_path):
    table = load_table("svhn_demo")
    _place(table, "kron_c32x16", tmp_path, {**OLD_RECORD, "macs_executed": 7})
    [res] = [r for r in collect(table, tmp_path, 1) if r.row.id == "kron_c32x16"]
    assert res.data["macs_executed"] == 7


DECL = {"name": "t", "reference": "dense",
        "rows": [{"id": "dense", "experiment": "svhn_table/dense", "family": "dense"}]}


def test_a_spec_in_the_old_form_loads_with_its_row_as_preset():
    table = table_from_dict(DECL)
    assert table.row("dense").preset == "svhn_table/dense"
    both = {**DECL, "rows": [{**DECL["rows"][0], "preset": "svhn_table/dense"}]}
    with pytest.raises(ValueError, match="'experiment' is the old name of 'preset'"):
        table_from_dict(both)
    with pytest.raises(ValueError, match="each row needs 'id' and 'preset'"):
        table_from_dict({**DECL, "rows": [{"id": "dense"}]})


def test_the_old_group_name_is_refused_with_the_new_one():
    from kron.cli_check import cli_config_error

    assert cli_config_error(["experiment=svhn_table/dense", "epochs=1"]) == (
        "experiment=svhn_table/dense: the config group 'experiment' is now 'preset'; use "
        "preset=svhn_table/dense")
    for bad in ("experiment=x", "+experiment=x", "preset=x"):
        with pytest.raises(ValueError, match="rows choose the preset"):
            check_overrides([bad])


def test_the_old_implementation_name_builds_the_composed_layer():
    import torch

    from kron.config_schema import check_train_config
    from kron.layers import KronLinear
    from kron.planning import apply_plan
    from kron.tables.run import composed_config

    torch.manual_seed(0)
    new = KronLinear(6, 4, [(2, 3)], implementation="composed", dtype=torch.float64)
    old = KronLinear(6, 4, [(2, 3)], implementation="dense", dtype=torch.float64)
    old.load_state_dict(new.state_dict())
    assert old.implementation == "composed"
    x = torch.randn(5, 6, dtype=torch.float64)
    assert torch.equal(old(x), new(x))  # the same op, not merely close
    auto = torch.nn.Sequential(KronLinear(6, 4, [(2, 3)]))
    apply_plan(auto, {"0": "dense"})  # a plan saved under the old name
    assert auto[0].planned_implementation == "composed"
    check_train_config(composed_config(["implementation=dense"]))  # accepted, no error


def test_a_renamed_config_key_moves_to_its_new_place():
    from kron.tables import renames

    old = {"measure": {"repeats": 10, "warmup": 5}, "layers": {"fc": {"implementation": "dense"}}}
    got = renames.config(old, {"measure.repeats": "timing.repeats"})
    assert got == {"measure": {"warmup": 5}, "timing": {"repeats": 10},
                   "layers": {"fc": {"implementation": "composed"}}}
    assert old["measure"] == {"repeats": 10, "warmup": 5}  # the record itself is not changed
    assert renames.config(old, {"absent.key": "x"})["measure"] == old["measure"]
