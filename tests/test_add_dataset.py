"""A new dataset is one module plus one YAML file, and nothing else is edited
(docs/notes/config.md, "Adding a dataset").

The throwaway dataset lives in tmp_path: its module registers it (kron.data.register_dataset)
with its own config keys, its YAML sits in a config folder that Hydra searches
(``hydra.searchpath``) and names the module (``module:``). The schema, the data builder, the
loader and a training run then take it like any of kron's own datasets.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kron.config_compose import compose_train
from kron.config_schema import ConfigError, check_train_config
from kron.data import build_datasets, build_loader, dataset_names, unregister_dataset

N_TRAIN, N_TEST = 48, 16

MODULE = '''
"""A throwaway dataset: item i is an image filled with the value i, labelled i % 2."""
from typing import Annotated

import torch
from torch.utils.data import Dataset

from kron.config_schema import DataConfig, Min
from kron.data import register_dataset


class FlatConfig(DataConfig):
    n_train: Annotated[int, Min(1)]
    n_test: Annotated[int, Min(1)]


class Flat(Dataset):
    classes = ["even", "odd"]

    def __init__(self, n, offset, transform):
        self.n, self.offset, self.transform = n, offset, transform

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x = torch.full((3, 32, 32), self.offset + i, dtype=torch.uint8)
        return (x if self.transform is None else self.transform(x)), i % 2


@register_dataset("{name}", FlatConfig)
def build_flat(cfg, split, transform):
    train = split == "train"
    return Flat(cfg["n_train"] if train else cfg["n_test"], 0 if train else 100, transform)
'''

YAML = f"""
name: {{name}}
module: {{module}}
n_train: {N_TRAIN}
n_test: {N_TEST}
num_classes: 2
in_channels: 3
input_size: 32
transforms:
  mean: [0.0, 0.0, 0.0]
  std: [1.0, 1.0, 1.0]
  train: {{{{}}}}
  test: {{{{}}}}
loader:
  num_workers: 0
  pin_memory: auto
  persistent_workers: false
"""


@pytest.fixture
def flat(tmp_path, monkeypatch, request) -> Iterator[tuple[str, list[str]]]:
    """(dataset name, overrides selecting it) for a dataset written into tmp_path."""
    name = module = f"flat_{request.node.name.split('[')[0][-20:]}"
    (tmp_path / f"{module}.py").write_text(MODULE.replace("{name}", name))
    (tmp_path / "conf" / "data").mkdir(parents=True)
    (tmp_path / "conf" / "data" / f"{name}.yaml").write_text(
        textwrap.dedent(YAML.format(name=name, module=module)))
    monkeypatch.syspath_prepend(str(tmp_path))  # the module: importable, as on PYTHONPATH
    yield name, [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", f"data={name}"]
    unregister_dataset(name)  # the registry is process-wide: leave it as found


def _compose(overrides: list[str]):
    return compose_train(overrides)


def test_a_new_dataset_is_one_module_and_one_yaml(flat):
    name, overrides = flat
    cfg = _compose(overrides)
    check_train_config(OmegaConf.to_container(cfg, resolve=True))  # its own keys are known
    assert name in dataset_names()
    train, test = build_datasets(cfg.data)
    assert (len(train), len(test)) == (N_TRAIN, N_TEST)
    loader = build_loader(test, cfg.data.loader, batch_size=8, train=False)
    x, y = next(iter(loader))
    # evaluation order, config's transforms: uint8 value v -> v / 255 (mean 0, std 1)
    assert torch.equal(y, torch.arange(8) % 2)
    assert torch.allclose(x[:, 0, 0, 0], (100 + torch.arange(8)) / 255.0)


def test_its_keys_are_checked_by_the_schema(flat):
    _, overrides = flat
    with pytest.raises(ConfigError, match=r"^data.n_train: expected a value >= 1, got 0$"):
        check_train_config(OmegaConf.to_container(_compose([*overrides, "data.n_train=0"]),
                                                  resolve=True))
    with pytest.raises(ConfigError, match=r"^data.n_test: missing required key$"):
        check_train_config(OmegaConf.to_container(_compose([*overrides, "~data.n_test"]),
                                                  resolve=True))
    with pytest.raises(ConfigError, match=r"^data.module: cannot import 'no_such_module_x'"):
        check_train_config(OmegaConf.to_container(
            _compose([*overrides, "data.module=no_such_module_x"]), resolve=True))


@pytest.mark.slow
def test_a_training_run_takes_the_new_dataset(flat, tmp_path: Path):
    from kron.train import train

    _, overrides = flat
    over = [*overrides, "layers=dense", "model.width=0.125", "epochs=1", "batch_size=16",
            "eval_batch_size=16", "measure.batch_size=2", "measure.warmup=1", "measure.repeats=1",
            "progress=false", "wandb.mode=disabled", "threads=1"]
    res = train(_compose(over), tmp_path / "run", over)
    assert res["epochs_done"] == 1 and res["config"]["data"]["n_train"] == N_TRAIN
