"""The schema holds types, bounds and allowed values, never a value (issue 20: one source of
values): every key the configs set is required, and allowed values follow the registries."""

from __future__ import annotations

import copy
import typing

import pytest
import yaml
from omegaconf import OmegaConf

from kron.config_compose import compose_train
from kron.config_schema import (
    SCHEDULES,
    ConfigError,
    DataConfig,
    TrainConfig,
    check_against,
    check_train_config,
    schema_keys,
)
from kron.layers.factory import KINDS
from kron.paths import CONFIG_DIR


def composed(overrides: list[str]) -> dict:
    return OmegaConf.to_container(compose_train(overrides), resolve=True)


def test_schedules_are_the_scheduler_configs():
    names = {yaml.safe_load(p.read_text())["name"]
             for p in (CONFIG_DIR / "scheduler").glob("*.yaml")}
    assert names == set(SCHEDULES)


@pytest.fixture(scope="module")
def default() -> dict:
    return composed([])


@pytest.mark.parametrize("key", sorted(schema_keys(TrainConfig)))
def test_every_top_level_key_is_required(default, key):
    cfg = copy.deepcopy(default)
    del cfg[key]
    with pytest.raises(ConfigError, match=rf"^{key}: missing required key$"):
        check_train_config(cfg)


def test_schema_classes_are_typed_dicts_without_values():
    for schema in (TrainConfig, DataConfig, *SCHEDULES.values()):
        assert typing.is_typeddict(schema)
        assert not any(hasattr(schema, k) for k in schema_keys(schema))  # no class defaults


def test_layer_kinds_come_from_the_factory():
    cfg = composed(["layers=kron_p10"])
    cfg["layers"]["features.conv*"]["kind"] = "kronn"
    with pytest.raises(ConfigError, match=r"^layers.features.conv\*.kind: expected one of "
                                          + ", ".join(map(repr, KINDS)) + ", got 'kronn'$"):
        check_train_config(cfg)


def test_a_schedule_has_its_own_keys():
    cfg = composed(["scheduler=step"])
    check_train_config(cfg)
    with pytest.raises(ConfigError, match=r"^scheduler.gamma: missing required key$"):
        check_against({k: v for k, v in cfg["scheduler"].items() if k != "gamma"},
                      SCHEDULES["step"], "scheduler")
    cfg["scheduler"]["min_lr_ratio"] = 0.1  # a cosine key
    with pytest.raises(ConfigError, match=r"^scheduler.min_lr_ratio: unknown key"):
        check_train_config(cfg)
