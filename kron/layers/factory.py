"""One factory for every factored layer: ``factorize(module, kind, ...)`` (docs/design.md,
D3).

Surgery, the sweeps, the tables and the compress command build layers only through
:func:`factorize`. It turns a dense ``nn.Linear`` / ``nn.Conv2d`` and a request (a kind and
either an explicit setting -- ``terms``, ``rank``, ``ranks`` -- or a ``param_ratio`` /
``mac_ratio`` budget) into the replacement layer. Budgets are met by building candidates on the
meta device and asking the layer classes for their parameters and ``analytic_macs``
(:mod:`kron.layers.budget`); rank bounds are the classes' own refusals. Every refusal is one
:class:`~kron.layers.errors.FactorizationError` whose line names the layer, the blocker (groups,
padding_mode, budget, shape) and the nearest setting that works.

Which kinds exist, and which classes, setting and budget search each uses, is the registry's
(:mod:`kron.layers.kinds`; kron's own in :mod:`kron.layers.builtin_kinds`): this module holds no
per-kind branch, so a new kind is one module and one YAML (docs/design.md, section 4).

``init`` says where the weights come from:

- ``"scratch"``: the layer's own variance-preserving initialisation;
- ``"dense"``: the closed-form fit to the dense weights: truncated SVD (lowrank, separable;
  optimal), nearest Kronecker sum by SVD of the rearranged weight (optimal for one term shape;
  several shapes are fitted greedily, each to what the previous ones left), HOSVD (tucker). CP
  has no closed form: ``dense`` runs the class's CP-ALS fit;
- ``"fit"``: ``dense`` then refinement where the closed form is not optimal: mixed Kronecker
  shapes get up to ``FIT_SWEEPS`` block-coordinate sweeps (each never raises the error). For
  the other kinds it equals ``dense`` (already optimal, or, CP, already iterated; Tucker keeps
  HOSVD: HOOI refinement is not implemented).

:func:`relative_fit_error` gives ``||W - W_hat||_F / ||W||_F`` of any built layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from kron.layers.budget import Budget, largest_rank
from kron.layers.builtin_kinds import FIT_SWEEPS, Setting
from kron.layers.errors import FactorizationError
from kron.layers.kinds import LayerKind, conv_kinds, layer_kind, layer_kinds, linear_kinds
from kron.layers.shapes import check_shape_rule

INITS = ("scratch", "dense", "fit")
# KINDS, LINEAR_KINDS, CONV_KINDS: computed by __getattr__ below (a static linter cannot see them)
__all__ = ["FIT_SWEEPS", "INITS", "describe", "detail", "factorize", "relative_fit_error",
           "validate_request"]

#: the kind names as tuples, computed on each access from the registry (kron.layers.kinds), so
#: a kind registered later is seen: ``KINDS`` all, ``LINEAR_KINDS`` / ``CONV_KINDS`` per type
_COMPUTED = {"KINDS": layer_kinds, "LINEAR_KINDS": linear_kinds, "CONV_KINDS": conv_kinds}


def __getattr__(name: str) -> tuple[str, ...]:
    if name in _COMPUTED:
        return _COMPUTED[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def describe(module: nn.Module) -> str:
    """A short shape description, e.g. ``Conv2d(128->256, 3x3)``, ``Conv2d(64->64, 3x3,
    groups=64)``, ``Linear(512->10)``, ``MultiheadAttention(768, 12 heads)``."""
    if isinstance(module, nn.Linear):
        return f"Linear({module.in_features}->{module.out_features})"
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        extra = "" if module.groups == 1 else f", groups={module.groups}"
        if module.padding_mode != "zeros":
            extra += f", padding_mode={module.padding_mode!r}"
        return f"Conv2d({module.in_channels}->{module.out_channels}, {kh}x{kw}{extra})"
    if isinstance(module, nn.MultiheadAttention):
        return f"MultiheadAttention({module.embed_dim}, {module.num_heads} heads)"
    return type(module).__name__


def validate_request(kind: str, *, init: str = "scratch", implementation: str = "auto",
                     terms: Any = None, rank: Any = None, ranks: Any = None,
                     param_ratio: Any = None, mac_ratio: Any = None, label: str = "layer",
                     shape_rule: Any = None) -> None:
    """Check a request without a layer (typos and contradictions, whatever it is applied to)."""
    kinds = layer_kinds()
    if kind not in kinds:
        raise FactorizationError(f"{label}: kind must be one of {list(kinds)}, got {kind!r} (a "
                                 "kind outside kron: set module: to the module registering it)")
    if init not in INITS:
        raise FactorizationError(f"{label}: init must be one of {list(INITS)}, got {init!r}")
    entry = None if kind == "dense" else layer_kind(kind)
    if implementation != "auto" and (entry is None or not entry.implementation):
        raise FactorizationError(f"{label}: implementation={implementation!r} applies to kind "
                                 f"'kron' only, not {kind!r}; drop it")
    if entry is None:
        return
    budget = param_ratio is not None or mac_ratio is not None
    if entry.knob == "terms":
        given, names = terms is not None, "'terms'"
    elif entry.knob == "ranks":
        given, names = ranks is not None or rank is not None, "'ranks' (or 'rank')"
    else:
        given, names = rank is not None, "'rank'"
    if given == budget:
        raise FactorizationError(f"{label}: kind {kind!r} needs exactly one of {names} or a "
                                 "'param_ratio'/'mac_ratio' target")
    if ranks is not None and entry.knob != "ranks":
        raise FactorizationError(f"{label}: 'ranks' is Tucker's (R_in, R_out); kind {kind!r} "
                                 "takes 'rank'")
    if entry.knob == "terms" and terms is not None and rank is not None:
        raise FactorizationError(f"{label}: 'rank' with 'terms' is ambiguous: repeat an A shape "
                                 "in terms for Kronecker rank (rank goes with a budget)")
    if shape_rule is not None:
        if entry.knob != "terms":
            raise FactorizationError(f"{label}: 'shape_rule' picks Kronecker term shapes; kind "
                                     f"{kind!r} has none: drop it")
        if not budget:
            raise FactorizationError(f"{label}: 'shape_rule' goes with a 'param_ratio'/"
                                     "'mac_ratio' budget, not with explicit 'terms'")
        check_shape_rule(shape_rule, label)


def factorize(
    module: nn.Module,
    kind: str,
    *,
    param_ratio: float | None = None,
    mac_ratio: float | None = None,
    rank: int | None = None,
    ranks: Sequence[int] | int | None = None,
    terms: Sequence[Sequence[int]] | None = None,
    init: str = "scratch",
    implementation: str = "auto",
    input_shape: Sequence[int] | None = None,
    name: str | None = None,
    shape_rule: str | None = None,
) -> nn.Module:
    """The ``kind`` replacement of a dense ``nn.Linear`` / ``nn.Conv2d`` (``kind="dense"``
    returns ``module`` itself), on the dense layer's device and dtype.

    Give either the setting (``terms`` for kron; ``rank`` for lowrank, separable, cp; ``ranks``
    ``(R_in, R_out)`` or ``rank`` for tucker) or a budget: the largest setting whose weight
    parameters (bias excluded) are within ``param_ratio`` of the dense weight and whose MACs on
    ``input_shape`` are within ``mac_ratio`` of the dense layer's. For kron with a budget,
    ``rank`` is the Kronecker rank (copies of the one chosen A shape; default 1) and
    ``shape_rule`` picks the shape (:data:`kron.layers.shapes.SHAPE_RULES`; default
    ``most_params``: the most parameters within budget, ties to the most balanced split).
    ``name`` (the module's name in its net) prefixes error messages.
    """
    label = f"{name} {describe(module)}" if name else describe(module)
    validate_request(kind, init=init, implementation=implementation, terms=terms, rank=rank,
                     ranks=ranks, param_ratio=param_ratio, mac_ratio=mac_ratio, label=label,
                     shape_rule=shape_rule)
    if kind == "dense":
        return module
    valid = linear_kinds() if isinstance(module, nn.Linear) else conv_kinds()
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise FactorizationError(f"{label}: only nn.Linear and nn.Conv2d can be factored "
                                 f"(blocker: type); leave it dense")
    if kind not in valid:
        raise FactorizationError(f"{label}: kind {kind!r} does not apply to a "
                                 f"{type(module).__name__}; valid kinds here: {list(valid)}")
    if input_shape is not None:
        _check_input_shape(module, input_shape, label)
    entry = layer_kind(kind)
    build = _guarded(module, entry, implementation, label)
    if param_ratio is None and mac_ratio is None:
        setting = entry.setting(terms, rank, ranks) if entry.setting else rank
        build(setting, "meta")  # the class's own checks, before any weight is touched
    else:
        budget = Budget.of(module, param_ratio, mac_ratio, input_shape, label)
        if entry.search is not None:
            rule = {} if shape_rule is None else {"shape_rule": shape_rule}
            setting = entry.search(module, budget, rank, build, label, **rule)
        else:
            setting = largest_rank(build, budget, label, lambda r: f"rank {r}")
    return _realise(module, entry, setting, init, implementation, build, label)


def relative_fit_error(dense: nn.Module, factored: nn.Module) -> float:
    """``||W - W_hat||_F / ||W||_F`` in float64: how far ``factored``'s composed weight
    (``dense_weight()``) is from ``dense``'s weight (0.0 for a zero weight fitted exactly)."""
    with torch.no_grad():
        w = dense.weight.detach().to(torch.float64)
        w_hat = factored.dense_weight().detach().to(device=w.device, dtype=torch.float64)
        if w_hat.shape != w.shape:
            raise FactorizationError(f"{describe(dense)}: the factored weight has shape "
                                     f"{tuple(w_hat.shape)}, not {tuple(w.shape)}")
        norm = w.norm().item()
        diff = (w - w_hat).norm().item()
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


def detail(layer: nn.Module) -> str:
    """What a built layer's setting is, e.g. ``terms 16x16x1x1 (R=2)``, ``rank 12``,
    ``ranks 3,5``; ``kept`` for a dense layer."""
    if hasattr(layer, "terms"):
        counts: dict[tuple, int] = {}
        for t in layer.terms:
            counts[tuple(t)] = counts.get(tuple(t), 0) + 1
        return "terms " + " + ".join("x".join(map(str, t)) + (f" (R={r})" if r > 1 else "")
                                     for t, r in counts.items())
    if hasattr(layer, "ranks"):
        return f"ranks {layer.ranks[0]},{layer.ranks[1]}"
    if hasattr(layer, "rank"):
        return f"rank {layer.rank}"
    return "kept" if isinstance(layer, (nn.Linear, nn.Conv2d)) else type(layer).__name__


# ------------------------------------------------------------------------------- internals


def _check_input_shape(module: nn.Module, shape: Sequence[int], label: str) -> None:
    shape = tuple(int(s) for s in shape)
    if isinstance(module, nn.Linear):
        ok, want = bool(shape) and shape[-1] == module.in_features, f"(*, {module.in_features})"
    else:
        ok = len(shape) in (3, 4) and shape[-3] == module.in_channels
        want = f"(N, {module.in_channels}, H, W)"
    if not ok:
        raise FactorizationError(f"{label}: input_shape must be {want}, got {shape}")


def _conv_kwargs(conv: nn.Conv2d, **changes: Any) -> dict:
    """The geometry keywords the factored conv classes take, copied from ``conv``; ``groups``
    and ``padding_mode`` only when not the default (so a class that lacks them refuses)."""
    kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
              bias=conv.bias is not None)
    groups, mode = changes.get("groups", conv.groups), changes.get("padding_mode",
                                                                   conv.padding_mode)
    if groups != 1:
        kw["groups"] = groups
    if mode != "zeros":
        kw["padding_mode"] = mode
    return kw


def _construct(module: nn.Module, kind: LayerKind, setting: Setting, implementation: str,
               device: Any, dtype: Any, **changes: Any) -> nn.Module:
    """The kind's layer class's constructor (scratch init), on ``device`` / ``dtype``."""
    place = dict(device=device, dtype=dtype)
    if kind.implementation:
        place["implementation"] = implementation
    arg = list(setting) if kind.knob == "terms" else setting
    if isinstance(module, nn.Linear):
        return kind.linear(module.in_features, module.out_features, arg,
                           bias=module.bias is not None, **place)
    geom = _conv_kwargs(module, **changes)
    return kind.conv(module.in_channels, module.out_channels, module.kernel_size, arg, **geom,
                     **place)


def _fit(module: nn.Module, kind: LayerKind, setting: Setting, init: str,
         implementation: str) -> nn.Module:
    """The kind's fit to ``module``'s weights (``init`` dense or fit, see above)."""
    if kind.fit is not None:
        return kind.fit(module, setting, init, implementation)
    if isinstance(module, nn.Linear):
        return kind.linear.from_linear(module, setting)
    return kind.conv.from_conv(module, setting)


def _blocker(module: nn.Module, kind: LayerKind, setting: Setting, implementation: str) -> str:
    """What stops ``setting`` on ``module``: the first of groups / padding_mode whose removal
    lets the class build it (found by building, not by reading messages), else the setting."""
    if isinstance(module, nn.Conv2d):
        changes = [c for c in ({"groups": 1}, {"padding_mode": "zeros"},
                               {"groups": 1, "padding_mode": "zeros"})
                   if any(getattr(module, k) != v for k, v in c.items())]
        for change in changes:
            try:
                _construct(module, kind, setting, implementation, "meta", None, **change)
            except (ValueError, TypeError):
                continue
            return " and ".join(f"{k}={getattr(module, k)!r}" for k in change)
    return "shape" if kind.knob == "terms" else "rank"


def _guarded(module: nn.Module, kind: LayerKind, implementation: str, label: str
             ) -> Callable[..., nn.Module]:
    """``build(setting, device)``: the scratch constructor, its refusals (and any TypeError of
    an argument it lacks) turned into one FactorizationError naming the blocker."""
    probe_impl = "factored" if implementation == "auto" else implementation

    def build(setting: Setting, device: Any = "meta") -> nn.Module:
        impl = probe_impl if device == "meta" else implementation
        dtype = None if device == "meta" else module.weight.dtype
        try:
            return _construct(module, kind, setting, impl, device, dtype)
        except (ValueError, TypeError) as err:
            raise _refusal(module, kind, setting, implementation, label, err) from None

    return build


def _refusal(module: nn.Module, kind: LayerKind, setting: Setting, implementation: str, label: str,
             err: Exception) -> FactorizationError:
    blocker = _blocker(module, kind, setting, implementation)
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    if blocker in ("shape", "rank"):
        hint = "choose another setting (the class's message names the valid ones)"
    else:
        hint = f"the layer builds without {blocker}; leave this layer dense (kind: dense)"
    return FactorizationError(f"{label}: {kind.name} refused ({first}); blocker: {blocker}; {hint}")


def _realise(module: nn.Module, kind: LayerKind, setting: Setting, init: str, implementation: str,
             build: Callable[..., nn.Module], label: str) -> nn.Module:
    """Build the chosen setting for real: scratch on the dense layer's device, else the fit."""
    if init == "scratch":
        return build(setting, module.weight.device)
    try:
        return _fit(module, kind, setting, init, implementation)
    except (ValueError, TypeError) as err:
        raise _refusal(module, kind, setting, implementation, label, err) from None

