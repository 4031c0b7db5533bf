"""The top level keeps the names users look for: ``configs/`` and ``experiments/`` lead to the
folders the package ships (docs/design.md, D7), so an edit through either path is the same."""

from __future__ import annotations

from pathlib import Path

from kron.paths import CONFIG_DIR, EXPERIMENTS_DIR

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_configs_and_experiments_are_the_packaged_folders():
    assert (ROOT / "configs").resolve() == CONFIG_DIR.resolve()
    assert (ROOT / "experiments").resolve() == EXPERIMENTS_DIR.resolve()
    assert (ROOT / "configs" / "train.yaml").is_file()
    assert (ROOT / "experiments" / "svhn.yaml").is_file()
