"""The dataset registry: which data config ``name`` builds which dataset, with which keys.

A dataset is one module plus one YAML file (docs/design.md, section 4; docs/notes/config.md).
The module declares its own config keys as a subclass of
:class:`kron.config_schema.DataConfig` (the keys every dataset has) and registers a builder::

    class ToyConfig(DataConfig):
        root: str

    @register_dataset("toy", ToyConfig)
    def build_toy(cfg, split, transform):  # split: "train" | "test"
        return ToyDataset(cfg["root"], split, transform)

``configs/data/toy.yaml`` sets ``name: toy`` and every key; a dataset whose module kron does not
import itself adds ``module: <importable module name>``, imported before ``name`` is looked up.
The schema takes its allowed dataset names and each dataset's keys from here, so no list of
names is written anywhere else. kron's own datasets register in :mod:`kron.data.builtin`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from torch.utils.data import Dataset

from kron.errors import ConfigError
from kron.plugins import import_plugin

#: ``build(cfg, split, transform)``: the ``train`` or ``test`` dataset of a checked, plain data
#: config, its items passed through ``transform`` (None: raw items)
Builder = Callable[[Mapping[str, Any], str, "Callable | None"], Dataset]

BUILTIN_MODULE = "kron.data.builtin"


@dataclass(frozen=True)
class DatasetEntry:
    """One registered dataset: its config name, builder and config schema (a ``TypedDict``
    subclass of ``DataConfig``)."""

    name: str
    build: Builder
    config: type


_REGISTRY: dict[str, DatasetEntry] = {}


def register_dataset(name: str, config: type) -> Callable[[Builder], Builder]:
    """Decorator: register ``build`` as the dataset a data config with ``name: <name>`` builds,
    its keys checked against ``config``. A second, different builder for a name is refused."""

    def register(build: Builder) -> Builder:
        if name in _REGISTRY and _origin(_REGISTRY[name].build) != _origin(build):
            raise ValueError(f"dataset {name!r} is registered twice ({_origin(build)[0]} and "
                             f"{_origin(_REGISTRY[name].build)[0]}); rename one of them.")
        _REGISTRY[name] = DatasetEntry(name, build, config)
        return build

    return register


def unregister_dataset(name: str) -> None:
    """Forget a dataset registered from outside kron (the registry is process-wide: a test or a
    notebook that registers a throwaway dataset removes it again); kron's own cannot go."""
    entry = _REGISTRY.get(name)
    if entry is not None and entry.build.__module__.startswith("kron."):
        raise ValueError(f"dataset {name!r} is kron's own and cannot be unregistered")
    _REGISTRY.pop(name, None)


def _origin(fn: Callable) -> tuple[str, str]:
    """Where a function is defined (the same code imported twice registers once)."""
    return fn.__code__.co_filename, fn.__qualname__


def dataset_names() -> list[str]:
    """The names of every dataset registered so far (kron's own ones always)."""
    import_module(BUILTIN_MODULE)
    return list(_REGISTRY)


def dataset_entry(values: Mapping[str, Any], key: str = "data") -> DatasetEntry:
    """The registered dataset data config ``values`` names, after importing its ``module`` if
    it names one; an unknown name or an unimportable module is one :class:`ConfigError`."""
    if "module" in values:
        import_plugin(values["module"], key, ConfigError)
    names = dataset_names()
    if "name" not in values:
        raise ConfigError(f"{key}.name: missing required key")
    name = values["name"]
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(f"{key}.name: expected one of {', '.join(map(repr, names))}, got "
                          f"{name!r} (a dataset outside kron: set {key}.module to the module "
                          "that registers it)")
    return _REGISTRY[name]


def dataset_config(values: Mapping[str, Any], key: str = "data") -> type:
    """The schema (``TypedDict``) of the dataset data config ``values`` names."""
    return dataset_entry(values, key).config
