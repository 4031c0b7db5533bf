"""The training config's schema: every key ``kron.train`` reads, with its type, checked at start.

A wrong type, an unknown key or a missing key is one :class:`ConfigError` whose message names the
key and what was expected, e.g. ``optimizer.lr: expected a float, got 'abc'``, instead of a
traceback from deep inside torch.

One source of values (docs/design.md, section 4): the YAML files under ``configs/`` are the only
place a value is written. The schema says types (``TypedDict`` classes), bounds (:class:`Min`)
and allowed values, and never a default: every key is required unless marked ``NotRequired``,
which means "may be absent" (e.g. ``wandb.entity`` under ``logger=none``), not "has a default".
Allowed values come from the registries the code has, not from copied lists (:class:`OneOf`
and :class:`Tagged` take a function that asks the registry): dataset names and each dataset's
own keys from :mod:`kron.data.registry`, model names from :data:`kron.models.MODELS`, layer
kinds from :func:`kron.layers.kinds.layer_kinds`, Kronecker implementations from
``KronLinear.implementations``. ``optimizer`` and ``model`` are checked against the signature of
what they build (:func:`check_kwargs`), so a new optimizer or model needs no schema edit;
``layers`` is checked in full by layer surgery, which knows its keys (the schema checks kinds).
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NotRequired, TypedDict, Union

from kron.errors import ConfigError

OPTIMIZER_META = ("_target_", "decay_kron_factors")  # keys of `optimizer` that are not kwargs
MODEL_SIZE_ARGS = ("num_classes", "in_channels", "input_size")  # filled from the data config


__all__ = ["ConfigError", "DataConfig", "KwargsOf", "Min", "OneOf", "Tagged", "check_against",
           "check_data_config", "check_kwargs", "check_train_config"]


# ----------------------------------------------------------------------------- markers
@dataclass(frozen=True)
class Min:
    """Bound: the value (when not null) is ``>= low``."""

    low: float


@dataclass(frozen=True)
class OneOf:
    """Allowed values: ``names()`` (a registry's keys, asked at check time), plus ``old()``:
    former names still accepted but not offered in messages (docs/design.md, section 1)."""

    names: Callable[[], typing.Iterable[Any]]
    old: Callable[[], typing.Iterable[Any]] = tuple


@dataclass(frozen=True)
class Tagged:
    """A mapping whose keys depend on its contents: ``schema(values, key)`` returns the
    ``TypedDict`` to check it against (e.g. a dataset's keys, chosen by ``name``), raising
    :class:`ConfigError` for a value no registry knows."""

    schema: Callable[[Mapping[str, Any], str], type]


@dataclass(frozen=True)
class KwargsOf:
    """A mapping of keyword arguments of ``fn`` (less ``skip``): names and the types their
    defaults imply (:func:`check_kwargs`)."""

    fn: Callable[..., Any]
    skip: tuple[str, ...] = ()  # allowed, not checked (e.g. ``_target_``)
    exclude: tuple[str, ...] = ()  # arguments the caller fills from other keys: refused here


# ----------------------------------------------------------------------------- the schema
def _dataset_names() -> list[str]:
    from kron.data.registry import dataset_names

    return dataset_names()


def _dataset_schema(values: Mapping[str, Any], key: str) -> type:
    from kron.data.registry import dataset_config

    return dataset_config(values, key)


class LoaderConfig(TypedDict):
    """DataLoader options; every one reaches the loader (kron/data/build.py: build_loader)."""

    num_workers: Annotated[int, Min(0)]
    pin_memory: bool | Literal["auto"]
    persistent_workers: bool


class TransformStage(TypedDict):
    """One stage's ops (kron/data/transforms.py); an absent (or null) op is not applied."""

    resize: NotRequired[int | list[int] | None]
    random_resized_crop: NotRequired[int | list[int] | None]
    center_crop: NotRequired[int | list[int] | None]
    random_crop: NotRequired[int | list[int] | None]
    padding: NotRequired[int | list[int] | None]
    fill: NotRequired[int | float]
    hflip: NotRequired[bool]


class TransformsConfig(TypedDict):
    mean: list[float]
    std: list[float]
    train: TransformStage
    test: TransformStage
    grayscale: NotRequired[bool]


class DataConfig(TypedDict):
    """The keys of every dataset; a dataset's own keys (``root``, ``synth``, ...) are declared by
    a subclass registered with it (:func:`kron.data.registry.register_dataset`)."""

    name: Annotated[str, OneOf(_dataset_names)]
    num_classes: Annotated[int, Min(1)]
    in_channels: Annotated[int, Min(1)]
    input_size: Annotated[int, Min(1)]
    transforms: TransformsConfig
    loader: LoaderConfig
    module: NotRequired[str]  # a module to import that registers `name` (a dataset outside kron)


class MeasureConfig(TypedDict):
    """Latency of the trained net against its dense twin, measured after training."""

    enabled: bool
    batch_size: Annotated[int, Min(1)]
    warmup: Annotated[int, Min(0)]
    repeats: Annotated[int, Min(1)]
    threads: int | None
    throughput_batch_size: Annotated[int | None, Min(1)]


class WandbConfig(TypedDict):
    """``configs/logger/*.yaml``; ``logger=none`` sets only ``mode`` and ``project``."""

    mode: Literal["online", "offline", "disabled"]
    project: str
    entity: NotRequired[str | None]
    group: NotRequired[str | None]
    name: NotRequired[str | None]
    tags: NotRequired[list[str]]


class _Schedule(TypedDict):
    name: str
    warmup_steps: Annotated[int, Min(0)]


class CosineSchedule(_Schedule):
    min_lr_ratio: Annotated[float, Min(0)]  # the floor, as a fraction of lr


class StepSchedule(_Schedule):
    milestones: list[float]  # fractions of the total steps
    gamma: float  # factor at each milestone


#: per-step learning-rate schedules (kron/recipe/fit.py: lr_at), each with its own keys
SCHEDULES: dict[str, type] = {"cosine": CosineSchedule, "step": StepSchedule,
                              "constant": _Schedule}


def _schedule_schema(values: Mapping[str, Any], key: str) -> type:
    _check_value(f"{key}.name", _required(values, "name", key),
                 Annotated[str, OneOf(lambda: SCHEDULES)])
    return SCHEDULES[values["name"]]


def _implementations() -> tuple[str, ...]:
    """Kronecker implementations (the widest set: KronConv2d's lacks triton)."""
    from kron.layers import KronLinear

    return KronLinear.implementations


def _old_implementations() -> tuple[str, ...]:
    """Former implementation names still read (``dense`` for ``composed``)."""
    from kron.layers.kron_base import OLD_IMPLEMENTATIONS

    return tuple(OLD_IMPLEMENTATIONS)


class TrainConfig(TypedDict):
    """The top level of configs/train.yaml (comments there say what each key does)."""

    data: Annotated[DataConfig, Tagged(_dataset_schema)]
    model: dict[str, Any]
    layers: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: Annotated[_Schedule, Tagged(_schedule_schema)]
    measure: MeasureConfig
    wandb: WandbConfig
    epochs: Annotated[int, Min(1)]
    batch_size: Annotated[int, Min(1)]
    seed: int
    resume: bool | str
    resume_force: bool
    init_from: str | None
    device: Literal["auto", "cpu", "cuda"]
    deterministic: bool
    amp: bool
    amp_dtype: Literal["bfloat16", "float16"]
    channels_last: bool | Literal["auto"]
    layers_strict: bool
    implementation: Annotated[str | None, OneOf(_implementations, _old_implementations)]
    plan_layers: bool
    compile: bool
    sync_bn: bool
    grad_clip: Annotated[float, Min(0)]
    eval_every: Annotated[int, Min(1)]
    eval_batch_size: Annotated[int | None, Min(1)]
    log_every: Annotated[int, Min(1)]
    progress: bool
    threads: int | None
    stop_after_epochs: Annotated[int | None, Min(1)]


# ----------------------------------------------------------------------------- the checker
_NAMES = {int: "an int", float: "a float", bool: "a bool (true/false)", str: "a string",
          list: "a list", dict: "a mapping", type(None): "null"}


def _is_schema(tp: Any) -> bool:
    return typing.is_typeddict(tp)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) if isinstance(a, str) else str(a).lower()
                                     for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is not None:
        return _NAMES.get(origin, str(tp))
    if _is_schema(tp):
        return "a mapping"
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _fits(value: Any, tp: Any) -> bool:
    """Whether ``value`` (plain, as OmegaConf resolves it) has type ``tp``; nested schemas
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
    if _is_schema(tp) or tp is dict:
        return isinstance(value, Mapping)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is type(None):
        return value is None
    if tp is list:
        return isinstance(value, (list, tuple))
    return isinstance(value, tp)


def _check_marker(key: str, value: Any, tp: Any, marker: Any) -> type | None:
    """Apply one ``Annotated`` marker; a :class:`Tagged` one returns the schema it chose."""
    if value is None:
        return None
    if isinstance(marker, Min) and value < marker.low:
        raise ConfigError(f"{key}: expected a value >= {marker.low:g}, got {value!r}")
    if isinstance(marker, OneOf):
        if value not in [*marker.names(), *marker.old()]:
            raise ConfigError(f"{key}: expected {_describe_annotated(tp, [marker])}, got "
                              f"{value!r}")
    if isinstance(marker, KwargsOf):
        check_kwargs(value, marker.fn, key, skip=marker.skip, exclude=marker.exclude)
    if isinstance(marker, Tagged):
        return marker.schema(value, key)
    return None


def _check_value(key: str, value: Any, tp: Any) -> None:
    chosen = None
    if typing.get_origin(tp) is Annotated:
        tp, *markers = typing.get_args(tp)
        if not _fits(value, tp):
            raise ConfigError(f"{key}: expected {_describe_annotated(tp, markers)}, got {value!r}")
        for marker in markers:
            chosen = _check_marker(key, value, tp, marker) or chosen
    if not _fits(value, tp):
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):  # walk into the member that fits
        tp = next(a for a in typing.get_args(tp) if _fits(value, a))
        origin = typing.get_origin(tp)
    if chosen is not None or _is_schema(tp):
        check_against(value, chosen or tp, key)
    elif origin is list and typing.get_args(tp):
        (item,) = typing.get_args(tp)
        for i, v in enumerate(value):
            _check_value(f"{key}[{i}]", v, item)


def _describe_annotated(tp: Any, markers: list[Any]) -> str:
    """``one of 'a', 'b' or null`` for a :class:`OneOf` string, else the type's description."""
    one_of = next((m for m in markers if isinstance(m, OneOf)), None)
    if one_of is None:
        return _describe(tp)
    text = "one of " + ", ".join(map(repr, one_of.names()))
    return text + " or null" if _fits(None, tp) else text


def _required(values: Mapping[str, Any], name: str, prefix: str) -> Any:
    if name not in values:
        raise ConfigError(f"{prefix + '.' if prefix else ''}{name}: missing required key")
    return values[name]


def schema_keys(schema: type) -> dict[str, tuple[Any, bool]]:
    """``{key: (type, required)}`` of a ``TypedDict`` schema, base classes' keys included."""
    hints = typing.get_type_hints(schema, include_extras=True)
    out = {}
    for name, tp in hints.items():
        optional = typing.get_origin(tp) is NotRequired
        out[name] = (typing.get_args(tp)[0] if optional else tp, not optional)
    return out


def check_against(values: Mapping[str, Any], schema: type, prefix: str = "") -> None:
    """Check a plain mapping against ``TypedDict`` ``schema``: unknown keys, missing required
    keys, wrong types, out-of-bound and disallowed values each raise one :class:`ConfigError`
    naming the full key."""
    keys = schema_keys(schema)
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in keys:
            raise ConfigError(f"{full}: unknown key; known keys here: {', '.join(keys)}")
        _check_value(full, value, keys[key][0])
    for name, (_, required) in keys.items():
        if required:
            _required(values, name, prefix)


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


def check_kwargs(values: Mapping[str, Any], fn: Any, prefix: str, skip: tuple[str, ...] = (),
                 exclude: tuple[str, ...] = ()) -> None:
    """Check keyword arguments against ``fn``'s signature: names it takes (less ``exclude``,
    which the caller fills), types its defaults imply (a float default wants a number, a bool
    default a bool); keys in ``skip`` are not arguments and not checked."""
    params = {n: p for n, p in inspect.signature(fn).parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    owner = getattr(fn, "__qualname__", str(fn))
    for key, value in values.items():
        if key in skip:
            continue
        if key not in params or key in (*MODEL_SIZE_ARGS, *exclude):
            known = [n for n in params if n not in ("params", "self", *MODEL_SIZE_ARGS, *exclude)]
            raise ConfigError(f"{prefix}.{key}: not an argument of {owner}; it takes "
                              f"{', '.join(known)}")
        default = params[key].default
        if default is not inspect.Parameter.empty and value is not None:
            _check_value(f"{prefix}.{key}", value, _default_type(default))


def check_data_config(values: Mapping[str, Any], prefix: str = "data") -> None:
    """Check a plain data config (``configs/data/*.yaml``, resolved) against the keys common
    to every dataset and those its dataset registered (:mod:`kron.data.registry`)."""
    _check_value(prefix, values, Annotated[DataConfig, Tagged(_dataset_schema)])


def check_train_config(cfg: Mapping[str, Any]) -> None:
    """Check a resolved training config (a plain dict; ``OmegaConf.to_container``) against the
    schema. Raises :class:`ConfigError` with a one-line message on the first problem."""
    import hydra.utils

    from kron.models import MODELS

    check_against(cfg, TrainConfig)
    opt = cfg["optimizer"]
    target = _required(opt, "_target_", "optimizer")
    if not isinstance(target, str):
        raise ConfigError("optimizer._target_: expected a class path such as torch.optim.SGD")
    try:
        cls = hydra.utils.get_class(target)
    except Exception as err:  # hydra raises ImportError or ValueError depending on the path
        raise ConfigError(f"optimizer._target_: cannot import {target!r} ({err})") from None
    _check_value("optimizer.decay_kron_factors",
                 _required(opt, "decay_kron_factors", "optimizer"), bool)
    check_kwargs(opt, cls.__init__, "optimizer", skip=OPTIMIZER_META)
    model = cfg["model"]
    _check_value("model.name", _required(model, "name", "model"),
                 Annotated[str, OneOf(lambda: MODELS)])
    check_kwargs(model, MODELS[model["name"]], "model", skip=("name",))
    _check_positive(cfg)
    _check_layer_kinds(cfg["layers"])


def _check_layer_kinds(layers: Mapping[str, Any]) -> None:
    """Each ``layers`` entry's ``kind`` is a kind the layer factory builds, after importing the
    entry's ``module`` (a kind outside kron) if it names one (surgery checks the rest of the
    entry against the model)."""
    from kron.layers.kinds import layer_kinds
    from kron.plugins import import_plugin

    for pattern, entry in layers.items():
        if isinstance(entry, Mapping) and "module" in entry:
            import_plugin(entry["module"], f"layers.{pattern}", ConfigError)
        if isinstance(entry, Mapping) and "kind" in entry:
            _check_value(f"layers.{pattern}.kind", entry["kind"],
                         Annotated[str, OneOf(layer_kinds)])


#: numbers that must be > 0 (where present); ``optimizer.lr`` may be 0 (frozen weights, used
#: to evaluate an initialisation) but not negative
POSITIVE = ("model.width",)
NON_NEGATIVE = ("optimizer.lr",)


def _check_positive(cfg: Mapping[str, Any]) -> None:
    for key in (*POSITIVE, *NON_NEGATIVE):
        group, name = key.split(".")
        if name not in cfg[group]:
            continue
        value = cfg[group][name]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key in POSITIVE and value <= 0:
            raise ConfigError(f"{key}: expected a value > 0, got {value!r}")
        if value < 0:
            raise ConfigError(f"{key}: expected a value >= 0, got {value!r}")
