"""The layer-kind registry: which ``kind`` name the factory builds from which layer classes.

A layer kind is one module plus one YAML file (docs/design.md, section 4; docs/notes/kinds.md).
A "rank-knob" kind is described fully by its classes::

    register_layer_kind("pointwise", conv=PointwiseConv2d)

where the conv class is built as ``cls(C, F, k, rank, stride=, padding=, dilation=, bias=,
device=, dtype=)`` (``groups`` / ``padding_mode`` passed only when not the default), fitted by
``cls.from_conv(conv, rank)``, and gives ``dense_weight()`` and ``analytic_macs(input_shape)``
and refuses a rank it cannot build with a ``ValueError``; a linear class likewise as
``cls(in, out, rank, bias=, device=, dtype=)`` and ``cls.from_linear(linear, rank)``. A
``param_ratio`` / ``mac_ratio`` budget then finds the largest rank that fits
(:func:`kron.layers.budget.largest_rank`). Kinds with another knob (kron's ``terms``, tucker's
``ranks``) register their own ``setting`` / ``search`` (and kron its own ``fit``). ``dense`` is
not registered: it is the layer itself. kron's own kinds register in
:mod:`kron.layers.builtin_kinds`; a kind outside kron names its module in the layers YAML entry
(``module: <importable module>``), imported by :func:`kron.plugins.import_plugin` before the
kind is looked up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from kron.layers.errors import FactorizationError

BUILTIN_MODULE = "kron.layers.builtin_kinds"
DENSE = "dense"
#: what a kind's setting is called in a request: ``rank`` (an int), ``ranks`` (tucker's pair,
#: ``rank`` accepted too) or ``terms`` (kron's list of A shapes)
KNOBS = ("rank", "ranks", "terms")


@dataclass(frozen=True)
class LayerKind:
    """One registered layer kind: its name, its classes and how its setting is found.

    ``setting(terms, rank, ranks)``: the setting of an explicit request (default: ``rank``).
    ``search(module, budget, rank, build, label)``: the setting for a budget (default: the
    largest rank within it). ``fit(module, setting, init, implementation)``: the fit to the
    dense weights (default: ``from_linear`` / ``from_conv``). ``implementation``: whether the
    classes take kron's ``implementation=`` keyword.
    """

    name: str
    linear: type | None = None
    conv: type | None = None
    knob: str = "rank"
    setting: Callable[..., Any] | None = None
    search: Callable[..., Any] | None = None
    fit: Callable[..., Any] | None = None
    implementation: bool = False


_REGISTRY: dict[str, LayerKind] = {}


def register_layer_kind(name: str, *, linear: type | None = None, conv: type | None = None,
                        knob: str = "rank", **hooks: Any) -> LayerKind:
    """Register the kind ``name`` built from ``linear`` and/or ``conv`` (see the module
    docstring; ``hooks``: ``setting``, ``search``, ``fit``, ``implementation`` of
    :class:`LayerKind`). Registering the same classes again is a no-op; different ones for a
    taken name are refused."""
    if not isinstance(name, str) or not name or name == DENSE:
        raise ValueError(f"layer kind name must be a non-empty string other than 'dense', got "
                         f"{name!r}")
    if linear is None and conv is None:
        raise ValueError(f"layer kind {name!r}: give a linear and/or a conv class")
    if knob not in KNOBS:
        raise ValueError(f"layer kind {name!r}: knob must be one of {list(KNOBS)}, got {knob!r}")
    kind = LayerKind(name, linear, conv, knob, **hooks)
    old = _REGISTRY.get(name)
    if old is not None and _origin(old) != _origin(kind):
        raise ValueError(f"layer kind {name!r} is registered twice ({_origin(kind)} and "
                         f"{_origin(old)}); rename one of them")
    _REGISTRY[name] = kind
    return kind


def unregister_layer_kind(name: str) -> None:
    """Forget a kind registered from outside kron (the registry is process-wide: a test or a
    notebook that registers a throwaway kind removes it again); kron's own cannot go."""
    kind = _REGISTRY.get(name)
    if kind is not None and any(c.__module__.startswith("kron.") for c in _classes(kind)):
        raise ValueError(f"layer kind {name!r} is kron's own and cannot be unregistered")
    _REGISTRY.pop(name, None)


def _classes(kind: LayerKind) -> list[type]:
    return [c for c in (kind.linear, kind.conv) if c is not None]


def _origin(kind: LayerKind) -> tuple[tuple[str, str], ...]:
    """Where a kind's classes are defined (the same module imported twice registers once)."""
    return tuple((c.__module__, c.__qualname__) for c in _classes(kind))


def _registry() -> dict[str, LayerKind]:
    import_module(BUILTIN_MODULE)
    return _REGISTRY


def layer_kinds() -> tuple[str, ...]:
    """Every kind name the factory builds: ``dense`` first, then the registered kinds in
    registration order (kron's own always; others once their module is imported)."""
    return (DENSE, *_registry())


def linear_kinds() -> tuple[str, ...]:
    """The kinds that replace an ``nn.Linear`` (``dense`` first)."""
    return (DENSE, *(n for n, k in _registry().items() if k.linear is not None))


def conv_kinds() -> tuple[str, ...]:
    """The kinds that replace an ``nn.Conv2d`` (``dense`` first)."""
    return (DENSE, *(n for n, k in _registry().items() if k.conv is not None))


def layer_kind(name: str) -> LayerKind:
    """The registered kind ``name`` (not ``dense``); an unknown name is a one-line
    :class:`FactorizationError`."""
    kind = _registry().get(name)
    if kind is None:
        raise FactorizationError(f"unknown layer kind {name!r}; kinds: {list(layer_kinds())} (a "
                                 "kind outside kron: set module: to the module registering it)")
    return kind
