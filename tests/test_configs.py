"""Every config option passes the training schema, every optimizer and model config builds
what it names, and every layers config swaps the layers it says."""

from __future__ import annotations

from fnmatch import fnmatchcase

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kron.config_schema import check_train_config
from kron.models import build_model_from_config
from kron.models.surgery import apply_surgery
from kron.paths import CONFIG_DIR
from kron.recipe.fit import build_optimizer

CONFIGS = CONFIG_DIR
GROUPS = ["data", "model", "layers", "optimizer", "scheduler", "logger", "launcher", "preset"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_default_config_passes_the_schema_and_runs_get_unique_folders():
    cfg = compose_train([])
    check_train_config(_job_config(cfg))
    assert cfg.data.name == "synth_svhn" and cfg.model.name == "svhn"
    dirs = OmegaConf.to_container(cfg.hydra, resolve=False)
    assert "%f" in dirs["run"]["dir"] and "%f" in dirs["sweep"]["dir"]  # microseconds: no clash


def _job_config(cfg) -> dict:
    """The config a job sees (Hydra's own node removed), resolved."""
    out = OmegaConf.to_container(cfg, resolve=False)
    out.pop("hydra", None)
    return OmegaConf.to_container(OmegaConf.create(out), resolve=True)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_passes_the_schema(group, option):
    check_train_config(_job_config(compose_train([f"{group}={option}"])))


@pytest.mark.parametrize("option", options("optimizer"))
def test_every_optimizer_config_builds_its_optimizer(option):
    cfg = compose_train([f"optimizer={option}"])
    opt = build_optimizer(OmegaConf.to_container(cfg.optimizer), torch.nn.Linear(3, 2))
    assert type(opt).__name__ == cfg.optimizer._target_.rsplit(".", 1)[-1]
    assert {g["name"]: g["weight_decay"] for g in opt.param_groups} == {
        "decay": cfg.optimizer.weight_decay, "no_decay": 0.0}
    assert all(g["lr"] == cfg.optimizer.lr for g in opt.param_groups)


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
    x = torch.zeros(1, cfg.data.in_channels, cfg.data.input_size, cfg.data.input_size)
    with torch.no_grad():
        assert net.eval()(x).shape == (1, cfg.data.num_classes)


@pytest.mark.parametrize("layers", [o for o in options("layers") if not o.startswith("alexnet")])
def test_every_layers_config_applies_to_svhn(layers):
    cfg = compose_train([f"layers={layers}"])
    net = build_model_from_config(cfg.model, 10, 3, 32)
    spec = OmegaConf.to_container(cfg.layers)
    rows = apply_surgery(net, spec, (1, 3, 32, 32))
    assert (len(rows) == 0) == (layers == "dense")
    for r in rows:  # each swapped layer became the kind its spec asks, with fewer parameters
        assert r.kind == next(e["kind"] for p, e in reversed(spec.items())
                              if fnmatchcase(r.name, p))
        assert r.params_after < r.params_before or (r.kind == "dense" and r.detail == "kept")


def test_alexnet_layers_config_applies():
    cfg = compose_train(["model=alexnet", "data=imagenet", "layers=alexnet_kron",
                         "model.width=0.25"])
    net = build_model_from_config(cfg.model, 1000, 3, 224)
    rows = apply_surgery(net, OmegaConf.to_container(cfg.layers), (1, 3, 224, 224))
    assert [r.name for r in rows] == ["features.6", "features.8", "features.10",
                                      "classifier.1", "classifier.4"]
