"""The configs compose to exactly the values they composed to before the schema lost its
defaults (issue 20: one source of values).

Run records are compared key by key with what the configs compose to now
(kron/tables/run.py: ``stale``), so moving defaults between the schema, the YAML files and the
code must not change one resolved value. ``tests/data/composed_configs.json`` holds the resolved
config of every option of every group, every preset alone and with the results page's
overrides, composed from the code before that change (commit f9bb405; the keys' ``experiment=``
later renamed ``preset=``, the group's new name, which changes no value). Regenerate it only for a
deliberate change of values: ``PYTHONPATH=$PWD python tests/test_config_schema_values.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kron.config_compose import compose_train
from kron.paths import CONFIG_DIR

SNAPSHOT = Path(__file__).parent / "data" / "composed_configs.json"
GROUPS = ("data", "model", "layers", "optimizer", "scheduler", "logger", "launcher")
PAGE = ["data=synth_svhn_hard", "model.width=1.0", "epochs=12", "batch_size=64",
        "eval_every=4", "progress=false"]  # kron/experiments/pages/results.yaml
ENV = ("KRON_DATA", "KRON_OUTPUTS", "WANDB_MODE")  # read by ${oc.env:...} in the configs


def composed(overrides: list[str]) -> dict:
    """The resolved job config (no ``hydra`` node) these overrides compose to."""
    return OmegaConf.to_container(compose_train(overrides), resolve=True)


def cases() -> list[list[str]]:
    """Every option of every group alone, every preset alone and with the page's overrides,
    and the page's overrides alone."""
    out: list[list[str]] = [[], PAGE]
    for group in GROUPS:
        out += [[f"{group}={p.stem}"] for p in sorted((CONFIG_DIR / group).glob("*.yaml"))]
    for p in sorted((CONFIG_DIR / "preset").rglob("*.yaml")):
        name = p.relative_to(CONFIG_DIR / "preset").with_suffix("").as_posix()
        if not p.stem.startswith("_"):
            out += [[f"preset={name}"], [f"preset={name}", *PAGE]]
    return out


def _snapshot() -> dict[str, dict]:
    return json.loads(SNAPSHOT.read_text()) if SNAPSHOT.is_file() else {}


@pytest.fixture(autouse=True)
def _fixed_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("key", sorted(_snapshot()))
def test_config_composes_to_its_recorded_values(key):
    assert composed(json.loads(key)) == _snapshot()[key]


def test_snapshot_covers_every_option_and_preset():
    missing = [c for c in cases() if json.dumps(c) not in _snapshot()]
    assert not missing, f"not in {SNAPSHOT.name}: {missing}; regenerate it (module docstring)"


if __name__ == "__main__":  # regenerate the snapshot (a deliberate change of values only)
    for name in ENV:
        os.environ.pop(name, None)
    snap = {json.dumps(c): composed(c) for c in cases()}
    tmp = SNAPSHOT.with_suffix(".tmp")
    tmp.write_text(json.dumps(snap, indent=1, sort_keys=True) + "\n")
    tmp.replace(SNAPSHOT)
    print(f"{len(snap)} configs written to {SNAPSHOT}")
