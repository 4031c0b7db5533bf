"""Every declared table's rows: the presets compose, their layer specs fit the nets,
and (slow) each row trains one tiny step on synthetic data through ``kron.train``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kron.config_compose import compose_train
from kron.models.surgery import apply_surgery
from kron.paths import CONFIG_DIR
from kron.tables.generated import net_from_config
from kron.tables.spec import list_tables, load_table

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = CONFIG_DIR
TABLES = {name: load_table(name) for name in list_tables()}
ROWS = [(t.name, r.id) for t in TABLES.values() for r in t.rows]
PAPER_TABLES = {"svhn", "scenetext", "imagenet", "hwdb"}


def compose_row(table: str, row: str, extra: list[str] = ()):
    t = TABLES[table]
    over = [f"preset={t.row(row).preset}", *t.overrides, *t.smoke, *extra]
    return compose_train(over), over


def fitted(cfg) -> bool:
    """Rows whose layers are fitted to the dense weights (SVD fits: seconds to minutes)."""
    return any((e or {}).get("init") == "dense" for e in cfg.layers.values())


def test_every_paper_table_is_declared():
    assert PAPER_TABLES <= set(TABLES)
    for name in PAPER_TABLES:
        t = TABLES[name]
        families = {r.family for r in t.rows}
        assert families == {"dense", "kron", "lowrank"}, name
        assert t.reference == "dense" and t.reconstruction, name
        assert any("large" in r.id for r in t.rows), name  # the larger-feature-map variant
        assert all(not r.paper for r in t.rows), f"{name}: a paper number needs its source"
    demo = TABLES["svhn_demo"]
    assert [r.id for r in demo.rows] == ["dense", "kron_c32x16", "kron_mixed", "lowrank_fc",
                                         "separable"]
    assert demo.seeds == 2 and "data=synth_svhn_hard" in demo.overrides


def test_every_preset_file_belongs_to_a_table():
    used = {r.preset for t in TABLES.values() for r in t.rows}
    files = {p.relative_to(CONFIGS / "preset").with_suffix("").as_posix()
             for p in (CONFIGS / "preset").glob("*_table/*.yaml")
             if not p.name.startswith("_")}
    assert files == used


@pytest.mark.parametrize("table,row", ROWS)
def test_row_composes_and_its_layers_fit(table, row):
    cfg, _ = compose_row(table, row)
    t = TABLES[table]
    assert cfg.wandb.name == t.row(row).preset  # how render --wandb finds the row
    spec = OmegaConf.to_container(cfg.layers, resolve=True)
    assert (t.row(row).family == "dense") == (not spec)
    if fitted(cfg):
        return  # fitted from dense weights: exercised by the slow test below
    net, input_shape = net_from_config(cfg)
    rows = apply_surgery(net, spec, input_shape)
    assert len(rows) == len({r.name for r in rows}) and (not spec) == (not rows)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("synth")
    return [f"data.root={root}", "data.synth.n_train=16", "data.synth.n_test=8",
            "data.loader.num_workers=0", "batch_size=8", "eval_batch_size=8", "epochs=1",
            "measure.enabled=false", "progress=false", "wandb.mode=disabled", "threads=1",
            "scheduler.warmup_steps=1"]


@pytest.mark.slow
@pytest.mark.parametrize("table,row", ROWS)
def test_row_trains_one_tiny_step(table, row, tiny, tmp_path):
    from kron.train import train

    cfg, over = compose_row(table, row, tiny)
    res = train(cfg, tmp_path, over)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["epochs_done"] == 1 and res["params"] > 0
    assert (res["params"] < res["params_dense"]) == (TABLES[table].row(row).family != "dense")


@pytest.mark.slow
def test_kron_tables_run_render_and_skip(tmp_path):
    """The real CLI: a two-row table runs as a Hydra multirun, renders, then skips or redoes."""
    exp = tmp_path / "experiments"
    exp.mkdir()
    data = tmp_path / "data"
    (exp / "mini.yaml").write_text(json.dumps({
        "name": "mini", "title": "Mini", "reference": "dense",
        "overrides": ["data=synth_svhn", f"data.root={data}", "data.synth.n_train=32",
                      "data.synth.n_test=16", "data.loader.num_workers=0", "model.width=0.25",
                      "batch_size=16", "epochs=1", "measure.repeats=2", "measure.warmup=1",
                      "measure.batch_size=4", "progress=false", "threads=1"],
        "rows": [{"id": "dense", "preset": "svhn_table/dense", "family": "dense"},
                 {"id": "kron", "preset": "svhn_table/kron_c16", "family": "kron"}]}))
    env = {**os.environ, "KRON_EXPERIMENTS": str(exp), "WANDB_MODE": "disabled"}
    out = tmp_path / "out"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "kron.tables", *args, "--out", str(out)],
                              env=env, capture_output=True, text=True, timeout=600)

    p = cli("run", "mini", "--render")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    runs = out / "tables" / "mini" / "runs" / "svhn_table"
    assert (runs / "dense/seed0/results.json").is_file()
    assert (runs / "kron_c16/seed0/results.json").is_file()
    csv = (out / "tables" / "mini" / "table.csv").read_text().splitlines()
    assert [line.split(",")[3] for line in csv[1:]] == ["ok", "ok"]
    p = cli("run", "mini")
    assert "nothing to run" in p.stdout and p.returncode == 0
    p = cli("run", "mini", "--rows", "kron", "--seeds", "2")  # seed 0 reused, seed 1 runs
    assert p.returncode == 0 and "skip kron seed 0" in p.stdout
    assert "running 1 row(s) x seeds 1: kron" in p.stdout
    assert json.loads((runs / "kron_c16/seed1/results.json").read_text())["config"]["seed"] == 1
    p = cli("render", "mini")  # as many seeds as ran: dense has 1 of 2
    assert "| dense | dense | 1/2 |" in p.stdout and "| kron | kron | 2 |" in p.stdout
    p = cli("run", "mini", "--rows", "kron", "--redo")
    assert p.returncode == 0 and "old folder moved" in p.stdout
    assert len(list((runs / "kron_c16").glob("seed0.old-*"))) == 1
    assert (runs / "kron_c16/seed0/results.json").is_file()
