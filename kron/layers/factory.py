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

from kron.layers.budget import Budget, largest_rank, try_build
from kron.layers.errors import FactorizationError

KINDS = ("dense", "kron", "lowrank", "separable", "cp", "tucker")
LINEAR_KINDS = ("dense", "kron", "lowrank")
CONV_KINDS = ("dense", "kron", "separable", "cp", "tucker")
INITS = ("scratch", "dense", "fit")
#: Block-coordinate sweeps of ``init="fit"`` for mixed Kronecker shapes (stops early at 1e-6).
FIT_SWEEPS = 100

Setting = Any  # kron: tuple of A shapes; lowrank/separable/cp: int; tucker: (r_in, r_out)


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
                     param_ratio: Any = None, mac_ratio: Any = None, label: str = "layer"
                     ) -> None:
    """Check a request without a layer (typos and contradictions, whatever it is applied to)."""
    if kind not in KINDS:
        raise FactorizationError(f"{label}: kind must be one of {list(KINDS)}, got {kind!r}")
    if init not in INITS:
        raise FactorizationError(f"{label}: init must be one of {list(INITS)}, got {init!r}")
    if implementation != "auto" and kind != "kron":
        raise FactorizationError(f"{label}: implementation={implementation!r} applies to kind "
                                 f"'kron' only, not {kind!r}; drop it")
    if kind == "dense":
        return
    budget = param_ratio is not None or mac_ratio is not None
    if kind == "kron":
        given, names = terms is not None, "'terms'"
    elif kind == "tucker":
        given, names = ranks is not None or rank is not None, "'ranks' (or 'rank')"
    else:
        given, names = rank is not None, "'rank'"
    if given == budget:
        raise FactorizationError(f"{label}: kind {kind!r} needs exactly one of {names} or a "
                                 "'param_ratio'/'mac_ratio' target")
    if ranks is not None and kind != "tucker":
        raise FactorizationError(f"{label}: 'ranks' is Tucker's (R_in, R_out); kind {kind!r} "
                                 "takes 'rank'")
    if kind == "kron" and terms is not None and rank is not None:
        raise FactorizationError(f"{label}: 'rank' with 'terms' is ambiguous: repeat an A shape "
                                 "in terms for Kronecker rank (rank goes with a budget)")


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
) -> nn.Module:
    """The ``kind`` replacement of a dense ``nn.Linear`` / ``nn.Conv2d`` (``kind="dense"``
    returns ``module`` itself), on the dense layer's device and dtype.

    Give either the setting (``terms`` for kron; ``rank`` for lowrank, separable, cp; ``ranks``
    ``(R_in, R_out)`` or ``rank`` for tucker) or a budget: the largest setting whose weight
    parameters (bias excluded) are within ``param_ratio`` of the dense weight and whose MACs on
    ``input_shape`` are within ``mac_ratio`` of the dense layer's. For kron with a budget,
    ``rank`` is the Kronecker rank (copies of the one chosen A shape; default 1) and the chosen
    shape is the one with the most parameters within budget, ties to the most balanced split.
    ``name`` (the module's name in its net) prefixes error messages.
    """
    label = f"{name} {describe(module)}" if name else describe(module)
    validate_request(kind, init=init, implementation=implementation, terms=terms, rank=rank,
                     ranks=ranks, param_ratio=param_ratio, mac_ratio=mac_ratio, label=label)
    if kind == "dense":
        return module
    valid = LINEAR_KINDS if isinstance(module, nn.Linear) else CONV_KINDS
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise FactorizationError(f"{label}: only nn.Linear and nn.Conv2d can be factored "
                                 f"(blocker: type); leave it dense")
    if kind not in valid:
        raise FactorizationError(f"{label}: kind {kind!r} does not apply to a "
                                 f"{type(module).__name__}; valid kinds here: {list(valid)}")
    if input_shape is not None:
        _check_input_shape(module, input_shape, label)
    build = _guarded(module, kind, implementation, label)
    if param_ratio is None and mac_ratio is None:
        setting = _given_setting(module, kind, terms, rank, ranks)
        build(setting, "meta")  # the class's own checks, before any weight is touched
    else:
        budget = Budget.of(module, param_ratio, mac_ratio, input_shape, label)
        setting = _setting_for_budget(module, kind, budget, rank, build, label)
    return _realise(module, kind, setting, init, implementation, build, label)


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


def _given_setting(module: nn.Module, kind: str, terms: Any, rank: Any, ranks: Any) -> Setting:
    if kind == "kron":
        return tuple(tuple(int(v) for v in t) for t in terms) if not isinstance(terms, str) \
            else terms  # a string is refused by the class with its own message
    if kind == "tucker":
        given = ranks if ranks is not None else rank
        return (int(given), int(given)) if isinstance(given, int) else tuple(given)
    return rank


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


def _construct(module: nn.Module, kind: str, setting: Setting, implementation: str,
               device: Any, dtype: Any, **changes: Any) -> nn.Module:
    """The layer class's constructor (scratch init), on ``device`` / ``dtype``."""
    from kron.layers.kron_conv import KronConv2d
    from kron.layers.kron_linear import KronLinear
    from kron.layers.lowrank import CPConv2d, LowRankLinear, SeparableConv2d, TuckerConv2d

    place = dict(device=device, dtype=dtype)
    if isinstance(module, nn.Linear):
        i, o, b = module.in_features, module.out_features, module.bias is not None
        if kind == "kron":
            return KronLinear(i, o, list(setting), bias=b, implementation=implementation,
                              **place)
        return LowRankLinear(i, o, setting, bias=b, **place)
    c, f, k = module.in_channels, module.out_channels, module.kernel_size
    geom = _conv_kwargs(module, **changes)
    if kind == "kron":
        return KronConv2d(c, f, k, list(setting), implementation=implementation, **geom, **place)
    cls = {"separable": SeparableConv2d, "cp": CPConv2d, "tucker": TuckerConv2d}[kind]
    return cls(c, f, k, setting, **geom, **place)


def _fit(module: nn.Module, kind: str, setting: Setting, init: str,
         implementation: str) -> nn.Module:
    """The layer class's fit to ``module``'s weights (``init`` dense or fit, see above)."""
    from kron.layers.kron_conv import KronConv2d
    from kron.layers.kron_linear import KronLinear
    from kron.layers.lowrank import CPConv2d, LowRankLinear, SeparableConv2d, TuckerConv2d

    if kind == "kron":
        cls = KronLinear.from_linear if isinstance(module, nn.Linear) else KronConv2d.from_conv
        if len(set(setting)) == 1:  # one shape: the SVD fit is optimal, no sweeps to choose
            return cls(module, list(setting), implementation=implementation)
        sweeps = FIT_SWEEPS if init == "fit" else 0
        return cls(module, list(setting), implementation=implementation, sweeps=sweeps)
    if kind == "lowrank":
        return LowRankLinear.from_linear(module, setting)
    cls = {"separable": SeparableConv2d, "cp": CPConv2d, "tucker": TuckerConv2d}[kind]
    return cls.from_conv(module, setting)


def _blocker(module: nn.Module, kind: str, setting: Setting, implementation: str) -> str:
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
    return "shape" if kind == "kron" else "rank"


def _guarded(module: nn.Module, kind: str, implementation: str, label: str
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


def _refusal(module: nn.Module, kind: str, setting: Setting, implementation: str, label: str,
             err: Exception) -> FactorizationError:
    blocker = _blocker(module, kind, setting, implementation)
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    if blocker in ("shape", "rank"):
        hint = "choose another setting (the class's message names the valid ones)"
    else:
        hint = f"the layer builds without {blocker}; leave this layer dense (kind: dense)"
    return FactorizationError(f"{label}: {kind} refused ({first}); blocker: {blocker}; {hint}")


def _realise(module: nn.Module, kind: str, setting: Setting, init: str, implementation: str,
             build: Callable[..., nn.Module], label: str) -> nn.Module:
    """Build the chosen setting for real: scratch on the dense layer's device, else the fit."""
    if init == "scratch":
        return build(setting, module.weight.device)
    try:
        return _fit(module, kind, setting, init, implementation)
    except (ValueError, TypeError) as err:
        raise _refusal(module, kind, setting, implementation, label, err) from None


# ----------------------------------------------------------------------- budget -> setting


def _setting_for_budget(module: nn.Module, kind: str, budget: Budget, rank: int | None,
                        build: Callable[..., nn.Module], label: str) -> Setting:
    if kind == "kron":
        return _kron_terms(module, budget, 1 if rank is None else int(rank), build, label)
    if kind == "tucker":
        c, f = _channels(module)

        def tucker(r: int) -> tuple[int, int]:  # one knob: the input rank keeps C/F
            return (max(1, min(c, round(r * c / f))), r)

        r = largest_rank(lambda r: build(tucker(r)), budget, label,
                         lambda r: f"ranks {tucker(r)}")
        return tucker(r)
    return largest_rank(build, budget, label, lambda r: f"rank {r}")


def _channels(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


def _per_group(module: nn.Module) -> nn.Module:
    """The dense layer one group of ``module`` is (a grouped conv is ``groups`` independent
    convs), on the meta device: what Kronecker term shapes are enumerated against."""
    if isinstance(module, nn.Linear) or (module.groups == 1
                                         and not isinstance(module.padding, str)):
        return module
    g = module.groups
    padding = module.padding if not isinstance(module.padding, str) else 0  # MACs: see caller
    return nn.Conv2d(module.in_channels // g, module.out_channels // g, module.kernel_size,
                     module.stride, padding, module.dilation, bias=False, device="meta")


def _kron_terms(module: nn.Module, budget: Budget, rank: int,
                build: Callable[..., nn.Module], label: str) -> Setting:
    """The single-shape rank-``rank`` terms with the most parameters within ``budget``."""
    from kron.layers.shapes import factorizations

    proxy = _per_group(module)
    exact_macs = isinstance(module, nn.Linear) or not isinstance(module.padding, str)
    hw = budget.input_shape[-2:] if budget.input_shape and exact_macs and isinstance(
        module, nn.Conv2d) else None
    cands = factorizations(proxy, input_hw=hw, rank=rank)
    if not cands:
        raise FactorizationError(
            f"{label}: no non-trivial rank-{rank} Kronecker split of a weight of shape "
            f"{tuple(proxy.weight.shape)} (blocker: shape); leave it dense or use kind lowrank "
            "/ tucker")
    smallest = build((cands[0].a_shape,) * rank)  # refusals here are not about the budget

    def balance(f: Any) -> float:
        return abs(math.log(math.prod(f.a_shape)) - math.log(math.prod(f.b_shape)))

    for f in sorted(cands, key=lambda f: (-f.params, balance(f))):
        if budget.param_ratio is not None and f.param_ratio > budget.param_ratio * (1 + 1e-12):
            continue
        if budget.mac_ratio is not None and f.mac_ratio is not None \
                and f.mac_ratio > budget.mac_ratio * (1 + 1e-12):
            continue
        m = try_build(build, (f.a_shape,) * rank)
        if m is not None and budget.meets(m):
            return (f.a_shape,) * rank
    near = f"{budget.achievable(smallest)} (A {cands[0].a_shape})"
    mac_best = min((f for f in cands if f.mac_ratio is not None), key=lambda f: f.mac_ratio,
                   default=None)
    if budget.mac_ratio is not None and mac_best is not None:
        near += f"; smallest mac_ratio {mac_best.mac_ratio:.4g} (A {mac_best.a_shape})"
    raise FactorizationError(f"{label}: no rank-{rank} Kronecker term meets "
                             f"{budget.describe()} (blocker: budget); smallest achievable {near}")
