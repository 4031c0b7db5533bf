"""Factor-shape sweeps: every valid Kronecker term shape of chosen layers within a budget.

``kron-tables sweep NAME --layer L --param-ratio P [overrides]`` composes the training config
(any model and data config, so also a user's own), lists each chosen layer's single-shape
Kronecker replacements whose parameter (and/or MAC) ratio to the dense layer is within budget,
and writes one generated preset (Hydra config) per shape plus a table declaration under
``<out>/tables/sweep_NAME/``. The sweep then runs and renders like any declared table: its plot
is the accuracy/cost trade-off of the shapes. Layers are swept one at a time (the others stay as
configured); the ``base`` row is the configuration itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from kron.config_compose import compose_train
from kron.layers import Factorization
from kron.layers.shapes import within_budget  # the one budget filter (also choose_terms')
from kron.tables.generated import GeneratedTable, Point, matching, net_from_config, slug
from kron.tables.spec import Table


@dataclass(frozen=True)
class SweepPoint:
    """One run of a sweep: ``layer`` replaced by ``rank`` Kronecker terms of A ``a_shape``."""

    id: str
    layer: str
    shape: Factorization

    @property
    def terms(self) -> list[list[int]]:
        return [list(self.shape.a_shape)] * self.shape.rank


def point_id(layer: str, a_shape: Sequence[int], rank: int) -> str:
    """A file- and Hydra-safe name, e.g. ``classifier_fc1__32x64`` (``_r2`` for rank 2)."""
    return f"{slug(layer)}__{'x'.join(map(str, a_shape))}" + (f"_r{rank}" if rank > 1 else "")


def compose_base(overrides: Sequence[str]):
    """The training config the sweep starts from (``configs/train.yaml`` + ``overrides``)."""
    bad = [o for o in overrides if o.split("=")[0].lstrip("+~") in ("preset", "experiment")]
    if bad:
        raise ValueError(f"{bad[0]!r}: a sweep generates its own presets; pass the model, "
                         "data and layers overrides directly (e.g. model=hwdb data=hwdb)")
    return compose_train(overrides)


def enumerate_points(cfg: Any, layers: Sequence[str], *, rank: int = 1,
                     param_ratio: float | None = None,
                     mac_ratio: float | None = None) -> list[SweepPoint]:
    """All sweep points of ``layers`` (names or glob patterns) of the net ``cfg`` builds."""
    from kron.models.surgery import record_input_shapes, replaceable_layers

    net, input_shape = net_from_config(cfg)
    found = replaceable_layers(net)
    shapes = record_input_shapes(net, input_shape)
    points: list[SweepPoint] = []
    for pattern in layers:
        hits = matching(found, [pattern])
        if not hits:
            raise ValueError(f"--layer {pattern!r} matches no Linear/Conv2d layer; layers: "
                             f"{', '.join(found)}")
        for name in hits:
            if name not in shapes:
                raise ValueError(f"--layer {name!r} is never called by the forward (its weight "
                                 "is read directly), so no replacement of it would run; "
                                 "sweep another layer")
            hw = shapes[name][-2:] if isinstance(found[name], nn.Conv2d) else None
            for f in within_budget(found[name], hw, rank=rank, param_ratio=param_ratio,
                                   mac_ratio=mac_ratio):
                points.append(SweepPoint(point_id(name, f.a_shape, rank), name, f))
    if not points:
        raise ValueError(f"no Kronecker shape of {', '.join(layers)} fits param_ratio="
                         f"{param_ratio}, mac_ratio={mac_ratio}; loosen the budget")
    return points


def _generated_point(p: SweepPoint, base_spec: dict) -> Point:
    """The generated row of ``p``: the base spec with ``p.layer`` replaced, last."""
    spec = {k: v for k, v in base_spec.items() if k != p.layer}
    spec[p.layer] = {"kind": "kron", "terms": p.terms}  # last entry wins over globs
    f = p.shape
    comment = (f"{p.layer} as {f.rank} term(s) A {f.a_shape} (x) B {f.b_shape}; param ratio "
               f"{f.param_ratio:.4g}" + ("" if f.mac_ratio is None else
                                         f", MAC ratio {f.mac_ratio:.4g}"))
    label = f"{p.layer} A {'x'.join(map(str, f.a_shape))}" + (f" R={f.rank}" if f.rank > 1
                                                              else "")
    return Point(p.id, "kron", label, spec, comment)


def write_sweep(name: str, cfg: Any, points: Sequence[SweepPoint], overrides: Sequence[str],
                out: str | Path | None = None, budget: str = "") -> Table:
    """Write the generated presets and ``table.yaml``; return the sweep's table."""
    from omegaconf import OmegaConf

    gen = GeneratedTable.at(f"sweep_{name}", out, "sweep", f"sweep ({name})")
    base_spec = OmegaConf.to_container(cfg.layers, resolve=True) or {}
    base = Point("base", "dense", "base (as configured)", base_spec,
                 "the configuration as given (reference row)")
    rows = gen.write_points([base, *(_generated_point(p, base_spec) for p in points)])
    passthrough = [o for o in overrides if o.split("=")[0].lstrip("+~") != "layers"]
    return gen.write_table({
        "name": gen.name, "title": f"Shape sweep {name}: {budget}", "reference": "base",
        "overrides": [*passthrough, gen.searchpath],
        "reconstruction": [f"Generated by kron-tables sweep with overrides: "
                           f"{' '.join(overrides) or '(none)'}; one layer swept at a time."],
        "headline": False, "rows": rows,
    })

