"""Factor-shape sweeps: every valid Kronecker term shape of chosen layers within a budget.

``kron-tables sweep NAME --layer L --param-ratio P [overrides]`` composes the training config
(any model and data config, so also a user's own), lists each chosen layer's single-shape
Kronecker replacements whose parameter (and/or MAC) ratio to the dense layer is within budget,
and writes one generated experiment config per shape plus a table declaration under
``<out>/tables/sweep_NAME/``. The sweep then runs and renders like any declared table: its plot
is the accuracy/cost trade-off of the shapes. Layers are swept one at a time (the others stay as
configured); the ``base`` row is the configuration itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from kron.fileio import atomic_write_text
from kron.layers import Factorization, factorizations
from kron.paths import CONFIG_DIR
from kron.tables.results import table_dir
from kron.tables.spec import Row, Table

CONFIGS = CONFIG_DIR


def within_budget(layer: nn.Module, input_hw: Sequence[int] | None = None, *, rank: int = 1,
                  param_ratio: float | None = None, mac_ratio: float | None = None,
                  include_trivial: bool = False) -> list[Factorization]:
    """The single-shape rank-``rank`` Kronecker replacements of ``layer`` within budget.

    A shape is kept when its parameter ratio is ``<= param_ratio`` and its MAC ratio ``<=
    mac_ratio`` (each bound only when given; conv MACs need ``input_hw``). Sorted by parameters.
    """
    if param_ratio is None and mac_ratio is None:
        raise ValueError("a sweep needs a budget: param_ratio and/or mac_ratio")
    for name, v in (("param_ratio", param_ratio), ("mac_ratio", mac_ratio)):
        if v is not None and not v > 0:
            raise ValueError(f"{name} must be > 0, got {v}")
    if mac_ratio is not None and input_hw is None and not isinstance(layer, nn.Linear):
        raise ValueError("a MAC budget on a conv layer needs its input size (input_hw)")
    return [f for f in factorizations(layer, input_hw=input_hw, rank=rank,
                                      include_trivial=include_trivial)
            if (param_ratio is None or f.param_ratio <= param_ratio)
            and (mac_ratio is None or (f.mac_ratio is not None and f.mac_ratio <= mac_ratio))]


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
    base = re.sub(r"[^A-Za-z0-9]+", "_", layer).strip("_")
    return f"{base}__{'x'.join(map(str, a_shape))}" + (f"_r{rank}" if rank > 1 else "")


def compose_base(overrides: Sequence[str]):
    """The training config the sweep starts from (``configs/train.yaml`` + ``overrides``)."""
    from hydra import compose, initialize_config_dir

    bad = [o for o in overrides if o.split("=")[0].lstrip("+~") == "experiment"]
    if bad:
        raise ValueError(f"{bad[0]!r}: a sweep generates its own experiments; pass the model, "
                         "data and layers overrides directly (e.g. model=hwdb data=hwdb)")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def enumerate_points(cfg: Any, layers: Sequence[str], *, rank: int = 1,
                     param_ratio: float | None = None,
                     mac_ratio: float | None = None) -> list[SweepPoint]:
    """All sweep points of ``layers`` (names or glob patterns) of the net ``cfg`` builds."""
    from kron.models import build_model_from_config
    from kron.models.surgery import record_input_shapes, replaceable_layers

    size, ch = int(cfg.data.input_size), int(cfg.data.in_channels)
    net = build_model_from_config(cfg.model, int(cfg.data.num_classes), ch, size)
    found = replaceable_layers(net)
    shapes = record_input_shapes(net, (1, ch, size, size))
    points: list[SweepPoint] = []
    for pattern in layers:
        hits = [n for n in found if n == pattern or fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"--layer {pattern!r} matches no Linear/Conv2d layer; layers: "
                             f"{', '.join(found)}")
        for name in hits:
            hw = shapes[name][-2:] if isinstance(found[name], nn.Conv2d) else None
            for f in within_budget(found[name], hw, rank=rank, param_ratio=param_ratio,
                                   mac_ratio=mac_ratio):
                points.append(SweepPoint(point_id(name, f.a_shape, rank), name, f))
    if not points:
        raise ValueError(f"no Kronecker shape of {', '.join(layers)} fits param_ratio="
                         f"{param_ratio}, mac_ratio={mac_ratio}; loosen the budget")
    return points


def _experiment_yaml(title: str, group: str, name: str, spec: dict, comment: str) -> str:
    body = {"defaults": [{"override /layers": "dense"}], "layers": spec,
            "wandb": {"name": f"{group}/{name}", "group": group}}
    return (f"# @package _global_\n# generated by kron-tables sweep ({title}): {comment}\n"
            + yaml.safe_dump(body, sort_keys=False, default_flow_style=None))


def write_sweep(name: str, cfg: Any, points: Sequence[SweepPoint], overrides: Sequence[str],
                out: str | Path | None = None, budget: str = "") -> Table:
    """Write the generated experiment configs and ``table.yaml``; return the sweep's table."""
    from omegaconf import OmegaConf

    tname = f"sweep_{name}"
    root = table_dir(tname, out).resolve()
    group = tname
    exp_dir = root / "configs" / "experiment" / group
    base_spec = OmegaConf.to_container(cfg.layers, resolve=True) or {}
    rows = [{"id": "base", "experiment": f"{group}/base", "family": "dense",
             "label": "base (as configured)"}]
    atomic_write_text(exp_dir / "base.yaml", _experiment_yaml(
        name, group, "base", base_spec, "the configuration as given (reference row)"))
    for p in points:
        spec = {k: v for k, v in base_spec.items() if k != p.layer}
        spec[p.layer] = {"kind": "kron", "terms": p.terms}  # last entry wins over globs
        f = p.shape
        comment = (f"{p.layer} as {f.rank} term(s) A {f.a_shape} (x) B {f.b_shape}; param ratio "
                   f"{f.param_ratio:.4g}" + ("" if f.mac_ratio is None else
                                             f", MAC ratio {f.mac_ratio:.4g}"))
        atomic_write_text(exp_dir / f"{p.id}.yaml",
                          _experiment_yaml(name, group, p.id, spec, comment))
        rows.append({"id": p.id, "experiment": f"{group}/{p.id}", "family": "kron",
                     "label": f"{p.layer} A {'x'.join(map(str, f.a_shape))}"
                              + (f" R={f.rank}" if f.rank > 1 else "")})
    passthrough = [o for o in overrides if o.split("=")[0].lstrip("+~") != "layers"]
    decl = {
        "name": tname, "title": f"Shape sweep {name}: {budget}", "reference": "base",
        "overrides": [*passthrough, f"hydra.searchpath=[file://{root / 'configs'}]"],
        "reconstruction": [f"Generated by kron-tables sweep with overrides: "
                           f"{' '.join(overrides) or '(none)'}; one layer swept at a time."],
        "headline": False, "rows": rows,
    }
    atomic_write_text(root / "table.yaml", "# generated by kron-tables sweep\n"
                      + yaml.safe_dump(decl, sort_keys=False))
    from kron.tables.spec import table_from_dict

    return table_from_dict(decl)


def sweep_rows(table: Table) -> list[Row]:
    """The non-base rows of a sweep table."""
    return [r for r in table.rows if r.id != "base"]
