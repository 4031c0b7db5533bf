"""Every config composes (lightning-hydra-template style) and every model config builds."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kron.paths import CONFIG_DIR
from kron.models import build_model_from_config
from kron.models.surgery import apply_surgery

CONFIGS = CONFIG_DIR
GROUPS = ["model", "layers", "optimizer", "scheduler", "logger", "launcher", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_default_config_contract():
    cfg = compose_train([])
    for key in ("epochs", "batch_size", "seed", "resume", "data", "model", "layers"):
        assert key in cfg
    assert cfg.wandb.mode in ("offline", "online", "disabled")
    assert cfg.data.name == "synth_svhn" and cfg.model.name == "svhn"
    dirs = OmegaConf.to_container(cfg.hydra, resolve=False)
    assert "%f" in dirs["run"]["dir"] and "%f" in dirs["sweep"]["dir"]  # microseconds: no clash
    OmegaConf.to_container(cfg.layers, resolve=True)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option):
    cfg = compose_train([f"{group}={option}"])
    assert OmegaConf.to_container(cfg, resolve=False)
    if group == "optimizer":
        hydra.utils.instantiate(cfg.optimizer)  # a partial: needs the parameters later


@pytest.mark.parametrize("model", options("model"))
def test_every_model_config_builds(model):
    data = {"hwdb": "hwdb", "scenetext": "icdar03", "alexnet": "imagenet",
            "resnet": "imagenet"}.get(model, "synth_svhn")
    over = [f"model={model}", f"data={data}"]
    if model in ("svhn", "scenetext", "hwdb", "alexnet"):
        over.append("model.width=0.125")
    cfg = compose_train(over)
    net = build_model_from_config(cfg.model, cfg.data.num_classes, cfg.data.in_channels,
                                  cfg.data.input_size)
    assert sum(p.numel() for p in net.parameters()) > 0


@pytest.mark.parametrize("layers", [o for o in options("layers") if not o.startswith("alexnet")])
def test_every_layers_config_applies_to_svhn(layers):
    cfg = compose_train([f"layers={layers}"])
    net = build_model_from_config(cfg.model, 10, 3, 32)
    rows = apply_surgery(net, OmegaConf.to_container(cfg.layers), (1, 3, 32, 32))
    assert (len(rows) == 0) == (layers == "dense")


def test_alexnet_layers_config_applies():
    cfg = compose_train(["model=alexnet", "data=imagenet", "layers=alexnet_kron",
                         "model.width=0.25"])
    net = build_model_from_config(cfg.model, 1000, 3, 224)
    rows = apply_surgery(net, OmegaConf.to_container(cfg.layers), (1, 3, 224, 224))
    assert [r.name for r in rows] == ["features.6", "features.8", "features.10",
                                      "classifier.1", "classifier.4"]
