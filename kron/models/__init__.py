"""Reconstructed baseline nets (one per dataset of the paper) and config-driven layer surgery."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from kron.models.hwdb import hwdb_net
from kron.models.imagenet import alexnet, resnet
from kron.models.scenetext import scenetext_net
from kron.models.svhn import svhn_net

MODELS: dict[str, Callable[..., nn.Module]] = {
    "svhn": svhn_net,
    "scenetext": scenetext_net,
    "hwdb": hwdb_net,
    "alexnet": alexnet,
    "resnet": resnet,
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the baseline called ``name`` (a key of ``MODELS``) with its keyword arguments."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)


def build_model_from_config(model_cfg: Mapping[str, Any], num_classes: int, in_channels: int,
                            input_size: int) -> nn.Module:
    """Build from a ``model`` config group entry (``name`` plus the builder's arguments)."""
    kwargs = {k: v for k, v in dict(model_cfg).items() if k != "name"}
    if model_cfg["name"] in ("alexnet", "resnet"):
        return build_model(model_cfg["name"], num_classes=num_classes, in_channels=in_channels,
                           **kwargs)
    return build_model(model_cfg["name"], num_classes=num_classes, in_channels=in_channels,
                       input_size=input_size, **kwargs)


__all__ = ["MODELS", "build_model", "build_model_from_config"]
