"""Where a model to compress or export comes from, and how to build it again.

Three sources, one record (:class:`Source`) that rebuilds the same architecture later (the
record holds only strings and primitives, so it travels inside a ``weights_only`` file):

- a torchvision model name (``torchvision.models.get_model(name, weights=None, **kwargs)``;
  weights are never downloaded: load a state dict with ``weights=PATH``);
- ``"package.module:callable"``, called with ``kwargs``, returning an ``nn.Module``;
- a kron training run folder (``.hydra/config.yaml`` + ``last.pt``): the run's net is built by
  the recipe's own :func:`kron.recipe.steps.surgered_model` and its checkpoint loaded.

Errors are one-line :class:`SourceError` messages naming the problem and the fix. See
docs/design.md, D2 and D3.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_SIZE = 224  # torchvision's classification nets are defined at 224x224


class SourceError(ValueError):
    """A model source that cannot be built (one line, naming the fix)."""


@dataclass
class Source:
    """How to build the uncompressed architecture again: ``kind`` is ``torchvision``,
    ``callable`` or ``run``; ``config`` is a run's Hydra config as YAML (runs only)."""

    kind: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    config: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Built:
    """A built model, the record that rebuilds it, and its natural input ``(1, C, H, W)``."""

    model: nn.Module
    source: Source
    input_shape: tuple[int, int, int, int]


def _torchvision(name: str, kwargs: dict[str, Any]) -> Built:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        near = difflib.get_close_matches(name, names, n=4)
        hint = (f"did you mean {', '.join(near)}?" if near else
                "see torchvision.models.list_models()")
        raise SourceError(f"{name!r} is not a torchvision model name, a module:callable or a run "
                          f"folder; {hint}")
    try:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    except (TypeError, ValueError) as err:
        raise SourceError(f"torchvision {name}({kwargs}): {err}") from None
    size = int(kwargs.get("image_size", DEFAULT_SIZE))
    return Built(model, Source("torchvision", name, dict(kwargs)), (1, 3, size, size))


def _callable(spec: str, kwargs: dict[str, Any]) -> Built:
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise SourceError(f"{spec!r}: cannot import {attr!r} from {module_name!r} ({err}); give "
                          "package.module:function on PYTHONPATH") from None
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise SourceError(f"{spec} returned a {type(model).__name__}, not an nn.Module")
    return Built(model, Source("callable", spec, dict(kwargs)), (1, 3, DEFAULT_SIZE, DEFAULT_SIZE))


def run_config(folder: Path) -> str:
    """A run folder's Hydra config as YAML: ``.hydra/config.yaml``, else the checkpoint's."""
    from kron.recipe.checkpoint import CKPT_NAME, load_checkpoint

    hydra_cfg = folder / ".hydra" / "config.yaml"
    if hydra_cfg.is_file():
        return hydra_cfg.read_text()
    if (folder / CKPT_NAME).is_file():
        cfg = load_checkpoint(folder / CKPT_NAME).get("config")
        if isinstance(cfg, str):
            return cfg
    raise SourceError(f"{folder} is not a kron run folder: no .hydra/config.yaml and no config "
                      f"in {CKPT_NAME}")


def build_run_net(config_yaml: str) -> tuple[nn.Module, tuple[int, int, int, int]]:
    """The net of a run's config as training built it (baseline + the run's surgery), with
    fresh weights, and its input shape. ``init_from`` is ignored: the caller loads weights."""
    from omegaconf import OmegaConf

    from kron.recipe.settings import ModelSettings
    from kron.recipe.steps import surgered_model

    cfg = OmegaConf.create(config_yaml)
    cfg.init_from = None
    shape = (int(cfg.data.in_channels), int(cfg.data.input_size), int(cfg.data.input_size))
    try:
        model, _, _ = surgered_model(ModelSettings.of(OmegaConf.to_container(cfg,
                                                                             resolve=True)))
    except ValueError as err:
        raise SourceError(f"rebuilding the run's net: {err}") from None
    return model, (1, *shape)


def _run(folder: Path) -> Built:
    from kron.recipe.checkpoint import CKPT_NAME, load_checkpoint

    if not (folder / CKPT_NAME).is_file():
        raise SourceError(f"{folder} has no {CKPT_NAME}: give a finished (or checkpointed) kron "
                          "run folder")
    config = run_config(folder)
    model, input_shape = build_run_net(config)
    load_weights(model, load_checkpoint(folder / CKPT_NAME)["model"], str(folder / CKPT_NAME))
    return Built(model, Source("run", str(folder.resolve()), {}, config), input_shape)


def build(source: str, kwargs: dict[str, Any] | None = None) -> Built:
    """Build ``source`` (a run folder, ``module:callable`` or torchvision name; see module
    docstring) with constructor ``kwargs``."""
    kwargs = dict(kwargs or {})
    path = Path(source)
    if path.is_dir():
        if kwargs:
            raise SourceError("model arguments do not apply to a run folder (its config says "
                              "how the net is built)")
        return _run(path)
    if ":" in source:
        return _callable(source, kwargs)
    return _torchvision(source, kwargs)


def rebuild(source: Source) -> nn.Module:
    """The uncompressed architecture a :class:`Source` record describes (fresh weights)."""
    if source.kind == "run":
        return build_run_net(source.config or "")[0]
    if source.kind == "callable":
        return _callable(source.name, source.kwargs).model
    if source.kind == "torchvision":
        return _torchvision(source.name, source.kwargs).model
    raise SourceError(f"unknown model source kind {source.kind!r}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``path``: a bare one, or a checkpoint holding it under ``model`` or
    ``state_dict`` (read with ``weights_only=True``)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as err:
        raise SourceError(f"--weights {path}: cannot read it ({str(err).splitlines()[0]})"
                          ) from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise SourceError(f"--weights {path} holds a {type(obj).__name__}, not a state dict")
    return obj


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """``model.load_state_dict(state)`` with a one-line error saying which keys differ."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes differ
        lines = [ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln]
        raise SourceError(f"{where} does not fit {type(model).__name__}: "
                          f"{lines[0] if lines else str(err).splitlines()[0]}") from None
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise SourceError(f"{where} does not fit {type(model).__name__}: {len(missing)} missing "
                          f"keys {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")
