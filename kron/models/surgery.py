"""Layer surgery: swap a net's Linear/Conv2d layers for Kronecker or low-rank ones by config.

A spec maps a module name or glob pattern (``fnmatch``) to what it becomes, e.g.::

    {"features.conv[3-5]": {"kind": "kron", "terms": [[16, 16, 1, 1]]},
     "classifier.fc1": {"kind": "kron", "param_ratio": 0.01},
     "classifier.*": {"kind": "lowrank", "rank": 64},
     "classifier.fc3": {"kind": "dense"}}

Patterns match ``nn.Linear`` / ``nn.Conv2d`` modules (subclasses too) and
``nn.MultiheadAttention``; a later entry overrides an earlier one for the layers both match (so
``kind: dense`` can exclude a layer from a glob). Every layer is built by
:func:`kron.layers.factorize` (``init``: scratch, dense or fit; see there).

Surgery finishes or changes nothing (docs/design.md, D3): every matched layer is
planned first (its replacement built, the model untouched), then all are swapped. A layer that
cannot meet its entry (budget out of reach, groups, a weight read without a call) stays dense
and its row says why; with ``strict=True`` such a layer refuses the whole surgery, before the
model is touched. Spec mistakes (unknown keys or kinds, a pattern matching nothing) always
refuse.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from kron.layers.errors import FactorizationError
from kron.layers.factory import describe, detail, factorize, relative_fit_error, validate_request
from kron.layers.kinds import layer_kinds
from kron.measure import count_params, layer_macs, linear_macs
from kron.models.attention import ProjectedMultiheadAttention
from kron.plugins import import_plugin

#: ``module``: a module to import that registers ``kind`` (a kind outside kron)
SPEC_KEYS = {"kind", "terms", "rank", "ranks", "param_ratio", "mac_ratio", "shape_rule", "init",
             "implementation",
             "module"}
SWAPPED, KEPT, LEFT_DENSE = "swapped", "kept", "left dense"
NOT_CALLED = ("never called by the probe forward (eval mode): its weight is read directly (e.g. "
              "by torchvision's shifted_window_attention) or it runs only in training (an "
              "auxiliary head), so a replacement might never run; its MACs are not counted")

__all__ = ["SurgeryRow", "SurgeryPlan", "apply_surgery", "plan_surgery", "format_table",
           "surgery_targets",
           "replaceable_layers", "record_input_shapes", "match_spec", "describe"]


@dataclass
class SurgeryRow:
    """One line of the surgery summary: what a layer was and what it became (MACs per image).

    ``kind`` is what the layer is now (``dense`` when left dense); ``requested`` the kind its
    spec entry asked for; ``status`` one of swapped / kept / left dense, with ``reason`` for the
    last; ``fit_error`` the relative Frobenius error of a layer fitted to the dense weights.
    """

    name: str
    kind: str
    shape: str
    detail: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    status: str = SWAPPED
    requested: str = ""
    reason: str = ""
    fit_error: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SurgeryPlan:
    """Every matched layer's row and the replacements to swap in (built, not yet swapped)."""

    rows: list[SurgeryRow] = field(default_factory=list)
    replacements: dict[str, nn.Module] = field(default_factory=dict)

    @property
    def left_dense(self) -> list[SurgeryRow]:
        return [r for r in self.rows if r.status == LEFT_DENSE]


def replaceable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` (subclasses included, e.g.
    ``NonDynamicallyQuantizableLinear``) by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def surgery_targets(model: nn.Module) -> dict[str, nn.Module]:
    """What a pattern may match: the replaceable layers and ``nn.MultiheadAttention`` modules
    (whose packed projection is a bare parameter: listed, so that nothing is skipped silently)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.MultiheadAttention))}


def record_input_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple]:
    """Input shape of the first call of every surgery target for one example of
    ``input_shape`` (batch 1); a target the forward never calls is absent.

    Runs one forward on zeros in eval mode (BN statistics untouched), on the model's device and
    in its dtype.
    """
    shapes: dict[str, tuple] = {}
    hooks = []
    for name, layer in surgery_targets(model).items():
        def hook(_m, args, kwargs, _name=name):
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)),
                         None)
            if first is not None:
                shapes.setdefault(_name, tuple(first.shape))
        hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    place = {} if param is None else {"device": param.device, "dtype": param.dtype}
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape[1:]), **place))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return shapes


def match_spec(model: nn.Module, spec: Mapping[str, Mapping]) -> dict[str, tuple[str, dict]]:
    """Resolve patterns to layers: ``{layer_name: (pattern, entry)}``, later patterns win.

    Raises ``ValueError`` for a pattern that matches nothing and for an entry with unknown keys,
    kind or init, or without exactly one of a setting and a budget.
    """
    layers = surgery_targets(model)
    all_names = {n: m for n, m in model.named_modules() if n}
    chosen: dict[str, tuple[str, dict]] = {}
    for pattern, entry in spec.items():
        entry = dict(entry or {})
        _check_entry(pattern, entry)
        hits = [n for n in layers if n == pattern or fnmatchcase(n, pattern)]
        if not hits:
            if pattern in all_names:
                raise ValueError(
                    f"layers: {pattern!r} is a {type(all_names[pattern]).__name__}; only "
                    f"Linear/Conv2d layers can be swapped: {_layer_list(layers)}")
            raise ValueError(
                f"layers: pattern {pattern!r} matches no Linear/Conv2d layer of "
                f"{type(model).__name__}; its layers are: {_layer_list(layers)}")
        for name in hits:
            chosen[name] = (pattern, entry)
    return {n: chosen[n] for n in layers if n in chosen}  # model order


def _check_entry(pattern: str, entry: dict) -> None:
    unknown = set(entry) - SPEC_KEYS
    where = f"layers[{pattern!r}]"
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; valid keys: "
                         f"{sorted(SPEC_KEYS)}")
    if "module" in entry:
        import_plugin(entry["module"], where, FactorizationError)
    if "kind" not in entry:
        raise ValueError(f"{where}: no 'kind'; add one of kind: {', '.join(layer_kinds())}")
    validate_request(entry["kind"], label=where, **_settings(entry))


def _settings(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A spec entry's request to the factory: everything but ``kind`` and ``module``."""
    return {k: v for k, v in entry.items() if k not in ("kind", "module")}


def _layer_list(layers: Mapping[str, nn.Module]) -> str:
    return ", ".join(f"{n} {describe(m)}" for n, m in layers.items())


def plan_surgery(model: nn.Module, spec: Mapping[str, Mapping] | None,
                 input_shape: tuple[int, ...]) -> SurgeryPlan:
    """Build the replacement of every layer ``spec`` matches, without touching ``model``.

    An ``nn.MultiheadAttention`` becomes a :class:`ProjectedMultiheadAttention` whose packed
    ``in_proj`` is factored as its entry says; its ``out_proj`` (called from then on, with the
    attention's input shape) follows its own entry, as any Linear.
    """
    plan = SurgeryPlan()
    if not spec:
        return plan
    targets = match_spec(model, spec)
    shapes = record_input_shapes(model, input_shape)
    for name, (_pattern, entry) in targets.items():
        layer = model.get_submodule(name)
        parent, _, child = name.rpartition(".")
        shape = shapes.get(name)
        if child == "out_proj" and isinstance(plan.replacements.get(parent),
                                              ProjectedMultiheadAttention):
            shape, layer = shapes[parent], plan.replacements[parent].out_proj
        row, new = _plan_one(name, layer, entry, shape)
        plan.rows.append(row)
        if new is not None:
            plan.replacements[name] = new
    return plan


def _plan_one(name: str, layer: nn.Module, entry: dict, shape: tuple | None
              ) -> tuple[SurgeryRow, nn.Module | None]:
    """The row of one matched layer and its replacement (None when it stays as it is)."""
    kind = entry["kind"]
    attention = isinstance(layer, nn.MultiheadAttention)
    params = sum(p.numel() for p in layer.parameters(recurse=False)) if attention else \
        count_params(layer)
    macs = _dense_macs(layer, shape)
    row = SurgeryRow(name, "dense", describe(layer), "kept", params, params, macs, macs,
                     status=KEPT, requested=kind)
    if kind == "dense":
        return row, None
    row.status = LEFT_DENSE
    if shape is None:
        row.reason = NOT_CALLED
        return row, None
    settings = _settings(entry)
    try:
        wrapper = ProjectedMultiheadAttention.from_mha(layer) if attention else None
        dense = layer if wrapper is None else wrapper.in_proj
        new = factorize(dense, kind, input_shape=shape, name=name, **settings)
    except FactorizationError as err:
        row.reason = _strip_label(str(err), name, layer)
        return row, None
    new.train(layer.training)
    if "init" in settings and settings["init"] != "scratch":  # absent: factorize's scratch
        row.fit_error = relative_fit_error(dense, new)
    row.kind, row.detail, row.status = kind, detail(new), SWAPPED
    row.params_after, row.macs_after = count_params(new), int(layer_macs(new, shape))
    if wrapper is not None:
        wrapper.in_proj = new
        return row, wrapper
    return row, new


def _dense_macs(layer: nn.Module, shape: tuple | None) -> int:
    """MACs of the dense layer per image (0 when never called); for an attention module, its
    packed input projection (the part surgery could factor)."""
    if shape is None:
        return 0
    if isinstance(layer, nn.MultiheadAttention):
        return linear_macs(shape, layer.embed_dim, 3 * layer.embed_dim)
    return int(layer_macs(layer, shape))


def _strip_label(message: str, name: str, layer: nn.Module) -> str:
    prefix = f"{name} {describe(layer)}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def apply_surgery(
    model: nn.Module,
    spec: Mapping[str, Mapping] | None,
    input_shape: tuple[int, ...],
    strict: bool = False,
) -> list[SurgeryRow]:
    """Replace ``model``'s layers in place as ``spec`` says; return one row per matched layer.

    ``input_shape`` is the model's input ``(N, C, H, W)`` (N is ignored: MACs are per image).
    All replacements are built before any is swapped in, so the model ends fully converted or
    untouched. A layer that cannot meet its entry stays dense (its row says why); with
    ``strict`` any such layer raises :class:`FactorizationError` (a ``ValueError``) listing them
    all, and the model is unchanged. Spec mistakes raise ``ValueError`` either way.
    """
    plan = plan_surgery(model, spec, input_shape)
    if strict and plan.left_dense:
        listed = "; ".join(f"{r.name} {r.shape}: {r.reason}" for r in plan.left_dense)
        raise FactorizationError(f"surgery refused (strict), model unchanged: "
                                 f"{len(plan.left_dense)} layer(s) cannot meet the spec: {listed}")
    for name, new in plan.replacements.items():
        _set_submodule(model, name, new)
    return plan.rows


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _ratio(before: int, after: int) -> str:
    return f"{before / after:.2f}x" if after else "-"


def format_table(rows: list[SurgeryRow]) -> str:
    """The surgery summary as a fixed-width table: one line per matched layer, the totals
    (parameters and MACs before -> after, and their compression ratios), then the layers left
    dense with the reason of each."""
    head = ("layer", "kind", "shape", "detail", "params", "->", "MACs/img", "->")
    lines = [(r.name, r.kind, r.shape, r.detail if r.status != LEFT_DENSE else "LEFT DENSE",
              f"{r.params_before:,}", f"{r.params_after:,}", f"{r.macs_before:,}",
              f"{r.macs_after:,}") for r in rows]
    left = [r for r in rows if r.status == LEFT_DENSE]
    p0, p1 = sum(r.params_before for r in rows), sum(r.params_after for r in rows)
    m0, m1 = sum(r.macs_before for r in rows), sum(r.macs_after for r in rows)
    if rows:
        swapped = sum(r.status == SWAPPED for r in rows)
        lines.append((f"total ({swapped} swapped, {len(left)} left dense)", "", "", "",
                      f"{p0:,}", f"{p1:,}", f"{m0:,}", f"{m1:,}"))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 4 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*row) for row in [head, *lines]]
    if rows:
        out.append(f"ratio: params {_ratio(p0, p1)}, MACs {_ratio(m0, m1)} "
                   "(matched layers, dense / after)")
        out.append(f"left dense: {len(left)}" + ("" if left else " (none)"))
        out.extend(f"  {r.name} {r.shape} (kind {r.requested}): {r.reason}" for r in left)
    return "\n".join(out)

