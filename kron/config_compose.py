"""The training config composed outside a Hydra app: ``configs/train.yaml`` plus overrides.

The one call of Hydra's compose API in kron: the tables (a sweep's or frontier's base config,
the demo's data folder, whether a run is stale), ``kron.train``'s command-line check, the
deploy benchmark and the tests all compose through :func:`compose_train`, so a config composes
the same way everywhere (docs/design.md, D7 and D9).

Hydra keeps one process-wide instance and refuses to initialise a second. ``compose_train``
clears it before composing and puts back whatever was there before when it returns (or
raises): called with no Hydra initialised it leaves none, and called inside a running Hydra app
or an ``initialize_config_dir`` block it leaves that app's instance in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig

TRAIN_CONFIG = "train"


def compose_train(overrides: Sequence[str] = (), *,
                  config_dir: str | Path | None = None) -> DictConfig:
    """``configs/train.yaml`` (or ``train.yaml`` in ``config_dir``) with ``overrides``
    applied, unresolved, as ``kron.train`` would receive it; Hydra's global state is as before.

    Raises Hydra's own errors (``hydra.errors.HydraException``, OmegaConf's) for overrides
    that do not compose; callers that want one line turn them into it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from kron.paths import CONFIG_DIR

    folder = Path(CONFIG_DIR if config_dir is None else config_dir).resolve()
    previous = GlobalHydra.instance().hydra
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(folder), version_base="1.3"):
            return compose(TRAIN_CONFIG, overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()
        if previous is not None:
            GlobalHydra.instance().initialize(previous)
