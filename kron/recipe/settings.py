"""The typed values the training recipe reads, made once from the config (:meth:`RunSettings.of`).

Each step takes its own part (``setup``, ``model``, ``place``, ``data``, ``fit``, ``measure``,
``wandb``, ``resume``), never the whole config, so a step's signature says what it depends on.
The config is schema-checked before (kron/config_schema.py) and the YAML provides every key,
so keys are indexed, never defaulted here. See docs/design.md, D6.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf


def input_shape(data: Mapping[str, Any]) -> tuple[int, int, int]:
    """(channels, height, width) of one input of the data config ``data`` (square inputs)."""
    size = int(data["input_size"])
    return int(data["in_channels"]), size, size


@dataclass(frozen=True)
class SetupSettings:
    """How the job runs: device, seed, numerics, threads (``batch_size``: the global batch,
    which must divide by the number of processes)."""

    device: str
    seed: int
    deterministic: bool
    threads: int | None
    amp: bool
    amp_dtype: str
    channels_last: bool | str
    batch_size: int


@dataclass(frozen=True)
class DataSettings:
    """The data config (resolved) and the batches: ``batch_size`` global, ``eval_batch_size``
    per process (None: ``batch_size``)."""

    config: dict[str, Any]
    seed: int
    batch_size: int
    eval_batch_size: int | None

    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one input."""
        return input_shape(self.config)


@dataclass(frozen=True)
class ModelSettings:
    """What builds the net: the ``model`` entry, the ``layers`` surgery spec, the input."""

    model: dict[str, Any]
    layers: dict[str, Any]
    implementation: str | None  # on every Kronecker entry of `layers` when set
    init_from: str | None
    layers_strict: bool
    num_classes: int
    shape: tuple[int, int, int]  # (channels, height, width) of one input

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> ModelSettings:
        """From a resolved training config (plain mapping); also rebuilds a run's net from its
        recorded config (kron/model_source.py, kron/bench_deploy.py)."""
        data = config["data"]
        return cls(dict(config["model"]), copy.deepcopy(dict(config["layers"] or {})),
                   config["implementation"], config["init_from"], bool(config["layers_strict"]),
                   int(data["num_classes"]), input_shape(data))


@dataclass(frozen=True)
class PlaceSettings:
    """How the built net is placed and planned: the global batch (the layer plan times a step
    at ``batch_size / world``), and the seed each rank's stream starts from after building."""

    seed: int
    batch_size: int
    plan_layers: bool
    sync_bn: bool
    compile: bool


@dataclass(frozen=True)
class FitSettings:
    """The fit: epochs, optimizer and schedule entries, and when to clip, evaluate, log, stop.
    ``config``: the resolved config, which each checkpoint stores so resume can check it."""

    epochs: int
    batch_size: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    grad_clip: float
    eval_every: int
    log_every: int
    progress: bool
    stop_after_epochs: int | None
    config: dict[str, Any]

    @property
    def lr(self) -> float:
        return float(self.optimizer["lr"])


@dataclass(frozen=True)
class MeasureSettings:
    """The latency measurement after training (``configs/train.yaml``: ``measure``)."""

    enabled: bool
    batch_size: int
    throughput_batch_size: int | None
    warmup: int
    repeats: int
    threads: int | None


@dataclass(frozen=True)
class WandbSettings:
    """The W&B run (``configs/logger``); ``mode: disabled`` opens none."""

    mode: str
    project: str
    entity: str | None
    group: str | None
    name: str | None
    tags: tuple[str, ...]


@dataclass(frozen=True)
class ResumeSettings:
    """``resume`` (false, true, or a checkpoint / run folder), ``resume_force``, and this run's
    resolved config, which a checkpoint must match."""

    resume: bool | str
    force: bool
    config: dict[str, Any]


@dataclass(frozen=True)
class RunSettings:
    """Everything the steps read, made once from the config by :meth:`of`. ``config`` is the
    resolved config as results.json and W&B record it; ``overrides`` the command line's."""

    setup: SetupSettings
    data: DataSettings
    model: ModelSettings
    place: PlaceSettings
    fit: FitSettings
    measure: MeasureSettings
    wandb: WandbSettings
    resume: ResumeSettings
    config: dict[str, Any]
    overrides: tuple[str, ...] = ()

    @classmethod
    def of(cls, cfg: DictConfig | Mapping[str, Any], overrides: list[str] | None = None
           ) -> RunSettings:
        """Read the (schema-checked) config; every key is indexed, as the YAML provides each."""
        c: dict[str, Any] = (OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
                             if isinstance(cfg, DictConfig) else copy.deepcopy(dict(cfg)))
        setup = SetupSettings(c["device"], int(c["seed"]), bool(c["deterministic"]),
                              c["threads"], bool(c["amp"]), c["amp_dtype"], c["channels_last"],
                              int(c["batch_size"]))
        data = DataSettings(c["data"], int(c["seed"]), int(c["batch_size"]),
                            c["eval_batch_size"])
        fit = FitSettings(int(c["epochs"]), int(c["batch_size"]), c["optimizer"],
                          c["scheduler"], c["grad_clip"], int(c["eval_every"]),
                          int(c["log_every"]), bool(c["progress"]), c["stop_after_epochs"], c)
        w = c["wandb"]  # logger=none sets only mode and project (the schema's NotRequired)
        opt = {k: w[k] if k in w else None for k in ("entity", "group", "name", "tags")}
        wandb = WandbSettings(w["mode"], w["project"], opt["entity"], opt["group"], opt["name"],
                              tuple(opt["tags"] or ()))
        resume = ResumeSettings(c["resume"], bool(c["resume_force"]), c)
        place = PlaceSettings(int(c["seed"]), int(c["batch_size"]), bool(c["plan_layers"]),
                              bool(c["sync_bn"]), bool(c["compile"]))
        return cls(setup, data, ModelSettings.of(c), place, fit, MeasureSettings(**c["measure"]),
                   wandb, resume, c, tuple(overrides or ()))
