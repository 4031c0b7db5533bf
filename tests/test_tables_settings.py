"""The Ran line: a rendered table says which setting its numbers come from (data, width,
schedule, optimiser), read back from the runs' records, not from the table's declaration."""

from __future__ import annotations

import copy

from kron.tables import render as R
from kron.tables.results import RunResult
from kron.tables.settings import settings_line
from kron.tables.spec import Row, Table

ROW = Row("dense", "svhn_table/dense", "Dense", "dense")
CONFIG = {"epochs": 10, "batch_size": 64, "grad_clip": 0.0,
          "data": {"name": "hwdb", "path": "data/synth_hwdb/hwdb.h5", "num_classes": 200,
                   "in_channels": 1, "input_size": 64,
                   "synth": {"n_train": 10000, "n_test": 2000, "seed": 0}},
          "model": {"name": "hwdb", "width": 0.5},
          "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.05, "momentum": 0.9,
                        "nesterov": True, "weight_decay": 0.0005},
          "scheduler": {"name": "cosine", "warmup_steps": 50}}


def run(config, seed=0, status="ok"):
    data = {"test_acc1": 90.0, "params": 10, "params_dense": 10, "config": config}
    return RunResult(ROW, status, data if status == "ok" else {}, seed=seed)


def test_the_line_reads_data_net_schedule_and_optimiser_from_the_records():
    assert settings_line([run(CONFIG, 0), run(CONFIG, 1)]) == (
        "Ran (read from the run records): data synthetic hwdb (10,000 train / 2,000 test), "
        "200 classes, 64x64x1 inputs; net hwdb at width 0.5; 10 epochs, batch 64; SGD lr 0.05, "
        "Nesterov momentum 0.9, weight decay 0.0005, cosine schedule after 50 warm-up steps, "
        "no gradient clipping; seeds 0, 1.")


def test_a_value_that_differs_between_runs_shows_every_value():
    other = copy.deepcopy(CONFIG)
    other["epochs"], other["grad_clip"] = 12, 2.0
    line = settings_line([run(CONFIG), run(other, 1), run({}, 2, status="missing")])
    assert "10 or 12 epochs" in line
    assert "gradient clipping at 0 or 2" in line
    assert line.endswith("seeds 0, 1.")  # the missing run's seed is not claimed


def test_real_data_names_its_file_and_no_config_means_no_line():
    real = copy.deepcopy(CONFIG)
    real["data"]["synth"] = None
    real["data"]["path"] = "data/hwdb/hwdb.h5"
    assert "data hwdb (data/hwdb/hwdb.h5), 200 classes" in settings_line([run(real)])
    assert settings_line([RunResult(ROW, "ok", {"test_acc1": 1.0})]) is None


def test_the_rendered_table_carries_the_line_and_scopes_the_declared_choices():
    table = Table("t", "T", (ROW,), reference="dense", headline=False,
                  reconstruction=("Data: the real HWDB, 30 epochs.",))
    md = R.to_markdown(table, [run(CONFIG)])
    assert "\nRan (read from the run records): data synthetic hwdb" in md
    assert ("Reconstruction choices of the declared table (for its full-size data and "
            "schedule; where they differ from the Ran line above, these numbers come from the "
            "Ran line's setting):") in md
    bare = R.to_markdown(table, [RunResult(ROW, "ok", {"test_acc1": 1.0})])
    assert "Ran (" not in bare and "Reconstruction choices of the declared table:" in bare
