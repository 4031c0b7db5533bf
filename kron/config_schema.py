"""The training config's schema: every key ``kron.train`` reads, with its type, checked at start.

A wrong type or an unknown key is one :class:`ConfigError` whose message names the key and what
was expected, e.g. ``optimizer.lr: expected a float, got 'abc'``, instead of a traceback from
deep inside torch. The schema is written as dataclasses (the top level, ``measure``, ``wandb``,
``scheduler``, ``data`` and ``data.loader``); ``optimizer`` and ``model`` are checked against the
signature of what they build (the optimizer class named by ``_target_``, the model builder named
by ``name``), so a new optimizer or model needs no schema edit. ``layers`` is checked by layer
surgery, which knows its keys. See docs/design.md, D6 and D8.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from kron.errors import ConfigError

OPTIMIZER_META = ("_target_", "decay_kron_factors")  # keys of `optimizer` that are not kwargs
MODEL_SIZE_ARGS = ("num_classes", "in_channels", "input_size")  # filled from the data config


__all__ = ["ConfigError", "check_against", "check_kwargs", "check_train_config"]


@dataclass
class MeasureConfig:
    """Latency of the trained net against its dense twin, measured after training."""

    enabled: bool = True
    batch_size: int = field(default=64, metadata={"min": 1})
    warmup: int = field(default=5, metadata={"min": 0})
    repeats: int = field(default=20, metadata={"min": 1})
    threads: int | None = None
    throughput_batch_size: int | None = field(default=None, metadata={"min": 1})


@dataclass
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = "offline"
    project: str = "kron"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class SchedulerConfig:
    """Per-step learning rate: linear warm-up, then ``name``'s decay (kron/recipe/optim.py)."""

    name: Literal["cosine", "step", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine: the floor, as a fraction of lr
    milestones: list[float] = field(default_factory=list)  # step: fractions of the total steps
    gamma: float = 0.1  # step: factor at each milestone


@dataclass
class LoaderConfig:
    """DataLoader options; every one reaches the loader (kron/data/build.py: build_loader)."""

    num_workers: int = field(default=2, metadata={"min": 0})
    pin_memory: bool | Literal["auto"] = "auto"
    persistent_workers: bool = True


@dataclass
class SynthConfig:
    n_train: int = 6000
    n_test: int = 2000
    seed: int = 0
    difficulty: Literal["easy", "hard"] = "easy"


@dataclass
class DataConfig:
    """One dataset; the keys after ``transforms`` belong to some datasets only."""

    name: Literal["svhn", "synth_svhn", "hwdb", "icdar03", "chars74k", "imagenet"]
    num_classes: int
    in_channels: int
    input_size: int
    transforms: dict[str, Any]
    loader: LoaderConfig
    root: str | None = None
    path: str | None = None
    train_split: str | None = None
    test_split: str | None = None
    train_subdir: str | None = None
    test_subdir: str | None = None
    verify_md5: bool | None = None
    case_sensitive: bool | None = None
    test_fraction: float | None = None
    split_seed: int | None = None
    synth: SynthConfig | None = None


@dataclass
class TrainConfig:
    """The top level of configs/train.yaml (comments there say what each key does)."""

    data: DataConfig
    model: dict[str, Any]
    layers: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: SchedulerConfig
    measure: MeasureConfig
    wandb: WandbConfig
    epochs: int = field(default=4, metadata={"min": 1})
    batch_size: int = field(default=64, metadata={"min": 1})
    seed: int = 0
    resume: bool | str = False
    resume_force: bool = False
    init_from: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = True
    amp: bool = True
    amp_dtype: Literal["bfloat16", "float16"] = "bfloat16"
    channels_last: bool | Literal["auto"] = "auto"
    layers_strict: bool = True
    implementation: str | None = None  # one of KronLinear.implementations
    plan_layers: bool = False
    compile: bool = False
    sync_bn: bool = True
    grad_clip: float = field(default=0.0, metadata={"min": 0})
    eval_every: int = field(default=1, metadata={"min": 1})
    eval_batch_size: int | None = field(default=None, metadata={"min": 1})
    log_every: int = field(default=10, metadata={"min": 1})
    progress: bool = True
    threads: int | None = None
    stop_after_epochs: int | None = field(default=None, metadata={"min": 1})


# ----------------------------------------------------------------------------- the checker
_NAMES = {int: "an int", float: "a float", bool: "a bool (true/false)", str: "a string",
          list: "a list", dict: "a mapping", type(None): "null"}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) if isinstance(a, str) else str(a).lower()
                                     for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is not None:
        return _NAMES.get(origin, str(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _fits(value: Any, tp: Any) -> bool:
    """Whether ``value`` (plain, as OmegaConf resolves it) has type ``tp``; nested dataclasses
    and containers are only checked at this level (their contents are walked separately)."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(tp))
    if origin is not None:
        tp = origin
    if dataclasses.is_dataclass(tp):
        return isinstance(value, Mapping)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is type(None):
        return value is None
    if tp is list:
        return isinstance(value, (list, tuple))
    if tp is dict:
        return isinstance(value, Mapping)
    return isinstance(value, tp)


def _check_value(key: str, value: Any, tp: Any) -> None:
    if not _fits(value, tp):
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):  # walk into the member that fits
        tp = next(a for a in typing.get_args(tp) if _fits(value, a))
        origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        check_against(value, tp, key)
    elif origin is list and typing.get_args(tp):
        (item,) = typing.get_args(tp)
        for i, v in enumerate(value):
            _check_value(f"{key}[{i}]", v, item)


def check_against(values: Mapping[str, Any], schema: type, prefix: str = "") -> None:
    """Check a plain mapping against dataclass ``schema``: unknown keys, missing required keys
    and wrong types each raise one :class:`ConfigError` naming the full key."""
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"{full}: unknown key; known keys here: {', '.join(fields)}")
        _check_value(full, value, hints[key])
        low = fields[key].metadata.get("min")
        if low is not None and value is not None and value < low:
            raise ConfigError(f"{full}: expected a value >= {low}, got {value!r}")
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in values:
            raise ConfigError(f"{prefix + '.' if prefix else ''}{name}: missing required key")


def _default_type(default: Any) -> Any:
    """The type a keyword argument's default implies (None and tensors accept anything)."""
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float)):
        return float if isinstance(default, float) else int | float
    if isinstance(default, str):
        return str
    if isinstance(default, tuple):
        return list
    return Any


def check_kwargs(values: Mapping[str, Any], fn: Any, prefix: str, skip: tuple[str, ...] = ()
                 ) -> None:
    """Check keyword arguments against ``fn``'s signature: names it takes, types its defaults
    imply (a float default wants a number, a bool default a bool)."""
    params = {n: p for n, p in inspect.signature(fn).parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    owner = getattr(fn, "__qualname__", str(fn))
    for key, value in values.items():
        if key in skip:
            continue
        if key not in params or key in MODEL_SIZE_ARGS:
            known = [n for n in params if n not in ("params", "self", *MODEL_SIZE_ARGS)]
            raise ConfigError(f"{prefix}.{key}: not an argument of {owner}; it takes "
                              f"{', '.join(known)}")
        default = params[key].default
        if default is not inspect.Parameter.empty and value is not None:
            _check_value(f"{prefix}.{key}", value, _default_type(default))


def check_train_config(cfg: Mapping[str, Any]) -> None:
    """Check a resolved training config (a plain dict; ``OmegaConf.to_container``) against the
    schema. Raises :class:`ConfigError` with a one-line message on the first problem."""
    import hydra.utils

    from kron.models import MODELS

    check_against(cfg, TrainConfig)
    opt = cfg["optimizer"]
    target = opt.get("_target_")
    if not isinstance(target, str):
        raise ConfigError("optimizer._target_: expected a class path such as torch.optim.SGD")
    try:
        cls = hydra.utils.get_class(target)
    except Exception as err:  # hydra raises ImportError or ValueError depending on the path
        raise ConfigError(f"optimizer._target_: cannot import {target!r} ({err})") from None
    _check_value("optimizer.decay_kron_factors", opt.get("decay_kron_factors", False), bool)
    check_kwargs(opt, cls.__init__, "optimizer", skip=OPTIMIZER_META)
    model = cfg["model"]
    if model.get("name") not in MODELS:
        raise ConfigError(f"model.name: expected one of {', '.join(MODELS)}, got "
                          f"{model.get('name')!r}")
    check_kwargs(model, MODELS[model["name"]], "model", skip=("name",))
    _check_positive(cfg)
    _check_implementation(cfg.get("implementation"))


def _check_implementation(value: Any) -> None:
    from kron.layers import KronLinear
    from kron.layers.kron_base import implementation_name

    IMPLEMENTATIONS = KronLinear.implementations  # the widest set: KronConv2d's lacks triton

    if value is not None and implementation_name(value) not in IMPLEMENTATIONS:
        raise ConfigError(f"implementation: expected one of {', '.join(map(repr, IMPLEMENTATIONS))}"
                          f" or null, got {value!r}")


#: numbers that must be > 0 (where present); ``optimizer.lr`` may be 0 (frozen weights, used
#: to evaluate an initialisation) but not negative
POSITIVE = ("model.width",)
NON_NEGATIVE = ("optimizer.lr",)


def _check_positive(cfg: Mapping[str, Any]) -> None:
    for key in (*POSITIVE, *NON_NEGATIVE):
        group, name = key.split(".")
        value = cfg.get(group, {}).get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key in POSITIVE and value <= 0:
            raise ConfigError(f"{key}: expected a value > 0, got {value!r}")
        if value < 0:
            raise ConfigError(f"{key}: expected a value >= 0, got {value!r}")
