"""Layer surgery: swap a net's Linear/Conv2d layers for Kronecker or low-rank ones by config.

A spec maps a module name or glob pattern (``fnmatch``) to what it becomes, e.g.::

    {"features.conv[3-5]": {"kind": "kron", "terms": [[16, 16, 1, 1]]},
     "classifier.fc1": {"kind": "kron", "param_ratio": 0.01},
     "classifier.*": {"kind": "lowrank", "rank": 64},
     "classifier.fc3": {"kind": "dense"}}

Patterns only match ``nn.Linear`` / ``nn.Conv2d`` modules; a later entry overrides an earlier one
for the layers both match (so ``kind: dense`` can exclude a layer from a glob). ``init: dense``
fits the new layer to the current dense weights (load the trained baseline first); ``init:
scratch`` (default) starts from the layer's own variance-preserving initialisation.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from kron.measure import count_params, layer_macs

KINDS = ("dense", "kron", "lowrank", "separable", "cp", "tucker")
SPEC_KEYS = {"kind", "terms", "rank", "ranks", "param_ratio", "mac_ratio", "init", "implementation"}
LINEAR_KINDS = ("dense", "kron", "lowrank")
CONV_KINDS = ("dense", "kron", "separable", "cp", "tucker")


@dataclass
class SurgeryRow:
    """One line of the surgery summary: what a layer was and what it became (MACs per image)."""

    name: str
    kind: str
    shape: str
    detail: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe(module: nn.Module) -> str:
    """A short shape description naming what the user can factor, e.g. ``Conv2d(128->256, 3x3)``."""
    if isinstance(module, nn.Linear):
        return f"Linear({module.in_features}->{module.out_features})"
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return f"Conv2d({module.in_channels}->{module.out_channels}, {kh}x{kw})"
    return type(module).__name__


def replaceable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` by qualified name (surgery targets)."""
    return {n: m for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}


def record_input_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple]:
    """Input shape of every Linear/Conv2d for one example of ``input_shape`` (batch 1).

    Runs one forward on zeros in eval mode (BN statistics untouched), on the model's device.
    """
    shapes: dict[str, tuple] = {}
    hooks = []
    for name, layer in replaceable_layers(model).items():
        def hook(_m, args, _name=name):
            shapes[_name] = tuple(args[0].shape)
        hooks.append(layer.register_forward_pre_hook(hook))
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape[1:]), device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return shapes


def match_spec(model: nn.Module, spec: Mapping[str, Mapping]) -> dict[str, tuple[str, dict]]:
    """Resolve patterns to layers: ``{layer_name: (pattern, entry)}``; later patterns win."""
    layers = replaceable_layers(model)
    all_names = {n: m for n, m in model.named_modules() if n}
    chosen: dict[str, tuple[str, dict]] = {}
    for pattern, entry in spec.items():
        entry = dict(entry or {})
        hits = [n for n in layers if n == pattern or fnmatchcase(n, pattern)]
        if not hits:
            if pattern in all_names:
                raise ValueError(
                    f"layers: {pattern!r} is a {type(all_names[pattern]).__name__}; only "
                    f"Linear/Conv2d layers can be swapped: {_layer_list(layers)}"
                )
            raise ValueError(
                f"layers: pattern {pattern!r} matches no Linear/Conv2d layer of "
                f"{type(model).__name__}; its layers are: {_layer_list(layers)}"
            )
        for name in hits:
            chosen[name] = (pattern, entry)
    return {n: chosen[n] for n in layers if n in chosen}  # model order


def _layer_list(layers: Mapping[str, nn.Module]) -> str:
    return ", ".join(f"{n} {describe(m)}" for n, m in layers.items())


def apply_surgery(
    model: nn.Module,
    spec: Mapping[str, Mapping] | None,
    input_shape: tuple[int, ...],
) -> list[SurgeryRow]:
    """Replace ``model``'s layers in place as ``spec`` says; return one row per matched layer.

    ``input_shape`` is the model's input ``(N, C, H, W)`` (N is ignored: MACs are per image).
    Raises ``ValueError`` naming the module, its shape and the valid choices when a pattern
    matches nothing or an entry does not fit its layer.
    """
    if not spec:
        return []
    targets = match_spec(model, spec)
    shapes = record_input_shapes(model, input_shape)
    rows = []
    for name, (pattern, entry) in targets.items():
        layer = model.get_submodule(name)
        where = f"layers[{pattern!r}] -> {name} {describe(layer)}"
        try:
            new, detail = _convert(layer, entry, shapes[name])
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where}: {err}") from None
        before_p, after_p = count_params(layer), count_params(new)
        before_m = layer_macs(layer, shapes[name])
        after_m = before_m if new is layer else layer_macs(new, shapes[name])
        if new is not layer:
            _set_submodule(model, name, new)
        rows.append(SurgeryRow(name, entry.get("kind", "?"), describe(layer), detail,
                               before_p, after_p, before_m, after_m))
    return rows


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _convert(layer: nn.Module, entry: dict, input_shape: tuple) -> tuple[nn.Module, str]:
    """Build the replacement of one layer from its spec entry; returns ``(module, detail)``."""
    unknown = set(entry) - SPEC_KEYS
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}; valid keys: {sorted(SPEC_KEYS)}")
    kind = entry.get("kind")
    is_linear = isinstance(layer, nn.Linear)
    valid = LINEAR_KINDS if is_linear else CONV_KINDS
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if kind not in valid:
        raise ValueError(f"kind {kind!r} does not apply to a {type(layer).__name__}; "
                         f"valid kinds here: {list(valid)}")
    init = entry.get("init", "scratch")
    if init not in ("scratch", "dense"):
        raise ValueError(f"init must be 'scratch' or 'dense', got {init!r}")
    if kind == "dense":
        return layer, "kept"
    if kind == "kron":
        return _to_kron(layer, entry, input_shape, init == "dense")
    return _to_lowrank(layer, kind, entry, input_shape, init == "dense")


def _to_kron(layer: nn.Module, entry: dict, input_shape: tuple, fit: bool):
    from kron.layers import KronConv2d, KronLinear, choose_terms, kron_term_shapes

    terms = entry.get("terms")
    budget = {k: entry.get(k) for k in ("param_ratio", "mac_ratio") if entry.get(k) is not None}
    if (terms is None) == (not budget):
        raise ValueError("kind 'kron' needs exactly one of 'terms' or a 'param_ratio'/'mac_ratio'"
                         " target")
    if terms is None:
        terms = choose_terms(layer, input_hw=tuple(input_shape[-2:]),
                             rank=int(entry.get("rank", 1)), **budget)
    terms = [tuple(int(v) for v in t) for t in terms]
    impl = entry.get("implementation", "auto")
    try:
        if isinstance(layer, nn.Linear):
            new = (KronLinear.from_linear(layer, terms, implementation=impl) if fit else
                   KronLinear(layer.in_features, layer.out_features, terms,
                              bias=layer.bias is not None, implementation=impl,
                              device=layer.weight.device, dtype=layer.weight.dtype))
        else:
            if fit:
                new = KronConv2d.from_conv(layer, terms, implementation=impl)
            else:
                new = KronConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, terms,
                                 stride=layer.stride, padding=layer.padding,
                                 dilation=layer.dilation, bias=layer.bias is not None,
                                 implementation=impl, device=layer.weight.device,
                                 dtype=layer.weight.dtype)
    except ValueError as err:
        if "valid" in str(err):  # the layer's own message already names the nearest choices
            raise
        shapes = kron_term_shapes(layer)
        shown = ", ".join(str(list(s)) for s in shapes[-12:])
        raise ValueError(f"{err} (the {len(shapes)} valid A shapes end with: {shown})") from None
    return new, "terms " + _terms_str(terms)


def _terms_str(terms: list[tuple]) -> str:
    counts: dict[tuple, int] = {}
    for t in terms:
        counts[t] = counts.get(t, 0) + 1
    return " + ".join(("x".join(map(str, t)) + (f" (R={r})" if r > 1 else ""))
                      for t, r in counts.items())


def _lowrank_builders(layer: nn.Module, kind: str) -> tuple[Callable, Callable, int]:
    """(scratch builder, dense-fit builder, max rank) for a low-rank kind."""
    from kron.layers.lowrank import CPConv2d, LowRankLinear, SeparableConv2d, TuckerConv2d

    if kind == "lowrank":
        def scratch(r):
            return LowRankLinear(layer.in_features, layer.out_features, r,
                                 bias=layer.bias is not None, device=layer.weight.device,
                                 dtype=layer.weight.dtype)
        return scratch, lambda r: LowRankLinear.from_linear(layer, r), min(layer.weight.shape)
    f, c, kh, kw = layer.weight.shape
    cls = {"separable": SeparableConv2d, "cp": CPConv2d, "tucker": TuckerConv2d}[kind]
    geom = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                bias=layer.bias is not None, device=layer.weight.device, dtype=layer.weight.dtype)
    if kind == "tucker":
        # one knob: the output rank; the input rank keeps the layer's C/F proportion
        def ranks(r):
            return (max(1, min(c, round(r * c / f))), r)
        return (lambda r: cls(c, f, layer.kernel_size, ranks(r), **geom),
                lambda r: cls.from_conv(layer, ranks(r)), f)
    max_rank = min(c * kh, f * kw) if kind == "separable" else min(c, f) * kh * kw
    return (lambda r: cls(c, f, layer.kernel_size, r, **geom),
            lambda r: cls.from_conv(layer, r), max_rank)


def _to_lowrank(layer: nn.Module, kind: str, entry: dict, input_shape: tuple, fit: bool):
    scratch, from_dense, max_rank = _lowrank_builders(layer, kind)
    key = "ranks" if kind == "tucker" else "rank"
    budget = {k: entry.get(k) for k in ("param_ratio", "mac_ratio") if entry.get(k) is not None}
    given = entry.get(key, entry.get("rank"))
    if (given is None) == (not budget):
        raise ValueError(f"kind {kind!r} needs exactly one of {key!r} or a "
                         "'param_ratio'/'mac_ratio' target")
    if kind == "tucker" and given is not None:
        ranks = tuple(int(r) for r in given) if not isinstance(given, int) else (given, given)
        from kron.layers.lowrank import TuckerConv2d

        geom = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                    bias=layer.bias is not None, device=layer.weight.device,
                    dtype=layer.weight.dtype)
        new = (TuckerConv2d.from_conv(layer, ranks) if fit else
               TuckerConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, ranks,
                            **geom))
        return new, f"ranks {ranks[0]},{ranks[1]}"
    rank = int(given) if given is not None else _rank_for_budget(
        layer, scratch, max_rank, input_shape, **budget)
    new = from_dense(rank) if fit else scratch(rank)
    detail = f"ranks {new.ranks[0]},{new.ranks[1]}" if kind == "tucker" else f"rank {rank}"
    return new, detail


def _rank_for_budget(layer: nn.Module, build: Callable, max_rank: int, input_shape: tuple,
                     param_ratio: float | None = None, mac_ratio: float | None = None) -> int:
    """The largest rank whose weight-parameter (and MAC) ratio to the dense layer is within
    budget (biases excluded on both sides, as in ``choose_terms``)."""
    dense_p = layer.weight.numel()
    dense_m = layer_macs(layer, input_shape)

    def fits(r: int) -> bool:
        m = build(r)
        bias = getattr(m, "bias", None)
        p = count_params(m) - (0 if bias is None else bias.numel())
        ok_p = param_ratio is None or p / dense_p <= param_ratio
        ok_m = mac_ratio is None or layer_macs(m, input_shape) / dense_m <= mac_ratio
        return ok_p and ok_m

    if not fits(1):
        raise ValueError(f"even rank 1 exceeds param_ratio={param_ratio}, mac_ratio={mac_ratio}")
    lo, hi = 1, max_rank  # invariant: fits(lo); binary search assumes cost grows with rank
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def format_table(rows: list[SurgeryRow]) -> str:
    """The surgery summary as a fixed-width text table with a total line."""
    head = ("layer", "kind", "shape", "detail", "params", "->", "MACs/img", "->")
    lines = [(r.name, r.kind, r.shape, r.detail, f"{r.params_before:,}", f"{r.params_after:,}",
              f"{r.macs_before:,}", f"{r.macs_after:,}") for r in rows]
    if rows:
        lines.append(("total", "", "", "",
                      f"{sum(r.params_before for r in rows):,}",
                      f"{sum(r.params_after for r in rows):,}",
                      f"{sum(r.macs_before for r in rows):,}",
                      f"{sum(r.macs_after for r in rows):,}"))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 4 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*row) for row in [head, *lines])


def dense_twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (used before surgery to keep the unswapped net for measurement)."""
    return copy.deepcopy(model)
