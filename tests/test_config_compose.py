"""kron.config_compose.compose_train: the config Hydra's own compose gives, and Hydra's global
state left as it was found (none, or a running app's)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import OmegaConf

from kron.config_compose import compose_train
from kron.paths import CONFIG_DIR

CASES = [[], ["preset=svhn_table/kron_c16", "model.width=0.25", "seed=3"],
         ["layers=svhn_kron", "optimizer=adamw", "+extra_key=1"]]


def hydra_compose(overrides: list[str]) -> dict:
    """Hydra's compose, initialised fresh (what every caller did before compose_train)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose("train", overrides=overrides), resolve=True)


@pytest.mark.parametrize("overrides", CASES)
def test_equals_hydras_compose_and_leaves_no_hydra(overrides):
    got = OmegaConf.to_container(compose_train(overrides), resolve=True)
    assert not GlobalHydra.instance().is_initialized()
    assert got == hydra_compose(overrides)


def test_inside_an_initialised_hydra_it_keeps_that_hydra(tmp_path):
    (tmp_path / "train.yaml").write_text("own: 1\n")  # another app's config folder
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        outer = GlobalHydra.instance().hydra
        cfg = compose_train(["seed=5"])
        assert cfg.seed == 5 and "own" not in cfg
        assert GlobalHydra.instance().hydra is outer
        assert compose("train") == {"own": 1}  # the app still composes its own config
        with pytest.raises(HydraException):
            compose_train(["no_such_key=1"])
        assert GlobalHydra.instance().hydra is outer  # after an error too
    assert not GlobalHydra.instance().is_initialized()


def test_another_config_dir(tmp_path):
    (tmp_path / "train.yaml").write_text("a: 1\nb: ${a}\n")
    cfg = compose_train(["a=7"], config_dir=tmp_path)
    assert OmegaConf.to_container(cfg, resolve=True) == {"a": 7, "b": 7}
