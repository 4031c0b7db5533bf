"""The accuracy frontier: each factorisation family at a series of matched budgets.

``kron-tables frontier TABLE_OR_MODEL --families kron,lowrank,separable,cp,tucker
--param-ratios 0.05,0.1,0.2 [--seeds N] [overrides]`` builds, for each family and budget, the
net with every swappable layer replaced at once, each layer at that parameter (or MAC) ratio
of its dense self, its shapes or ranks chosen by surgery's budget targets
(``kron.layers.choose_terms`` for Kronecker terms, the largest rank within budget for the
low-rank kinds). The points run as one generated table (``<out>/tables/frontier_<name>/``) with
the dense net as reference; the render adds one error-vs-params and one error-vs-speedup plot
with a line per family, and a table of the best family at each budget and whether its lead
exceeds the seeds' spread (docs/design.md, D9).

Swappable layers: every Linear/Conv2d except the input layer (reads the image's channels) and
the output layer (writes the classes), as in the paper tables; ``--layers`` names others.
Families: ``kron`` (Kronecker convs and Linear), ``separable``/``cp``/``tucker`` (that conv
factorisation, low-rank Linear layers), ``lowrank`` (low-rank Linear layers only: a conv has no
plain low-rank kind, so the convs stay dense and the points sit at more parameters).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from kron.config_compose import compose_train
from kron.layers.shapes import check_shape_rule
from kron.tables.aggregate import Stat, separated
from kron.tables.generated import (
    DENSE_DEFAULTS,
    GeneratedTable,
    Point,
    matching,
    net_from_config,
    slug,
)
from kron.tables.spec import Table, list_tables, load_table

#: family -> (kind for a Conv2d, kind for a Linear); None leaves that layer dense
FAMILY_KINDS: dict[str, tuple[str | None, str | None]] = {
    "kron": ("kron", "kron"),
    "lowrank": (None, "lowrank"),
    "separable": ("separable", "lowrank"),
    "cp": ("cp", "lowrank"),
    "tucker": ("tucker", "lowrank"),
}


def parse_list(text: str, what: str, cast=str) -> list:
    """A comma-separated option as a list, with a one-line error naming ``what``."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        out = [cast(t) for t in items]
    except ValueError:
        raise ValueError(f"{what} must be a comma-separated list, got {text!r}") from None
    if not out:
        raise ValueError(f"{what} is empty")
    return out


def base_overrides(target: str, overrides: Sequence[str]) -> tuple[str, list[str], str | None]:
    """(name, overrides of the dense base run, the preset it starts from) for a declared
    table (its reference row and shared overrides) or a model config name."""
    bad = [o for o in overrides
           if o.split("=")[0].lstrip("+~") in ("preset", "experiment", "layers")]
    if bad:
        raise ValueError(f"{bad[0]!r}: the frontier sets the preset and layers itself; "
                         "pass the model/data overrides only")
    if target in list_tables():
        table = load_table(target)
        if table.reference is None:
            raise ValueError(f"table {target!r} has no reference (dense) row to start from")
        exp = table.row(table.reference).preset
        return target, [*table.overrides, *overrides], exp
    from kron.paths import CONFIG_DIR

    models = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
    if target not in models:
        raise ValueError(f"{target!r} is neither a table ({', '.join(list_tables())}) nor a "
                         f"model config ({', '.join(models)})")
    return target, [f"model={target}", *overrides], None


def base_config(overrides: Sequence[str], preset: str | None):
    """The training config the frontier starts from: ``preset`` (else the dense layers)
    with ``overrides``."""
    return compose_train([*([f"preset={preset}"] if preset else ["layers=dense"]), *overrides])


def swappable(cfg: Any, patterns: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """The layers a frontier replaces: ``patterns`` (names or globs), else all but the input
    and output layers."""
    from kron.models.surgery import replaceable_layers

    net, _ = net_from_config(cfg)
    layers = replaceable_layers(net)
    if patterns:
        chosen = {n: layers[n] for n in matching(layers, patterns)}
        if not chosen:
            raise ValueError(f"--layers {','.join(patterns)} matches no Linear/Conv2d layer; "
                             f"layers: {', '.join(layers)}")
        return chosen
    names = list(layers)
    return {n: layers[n] for n in names[1:-1]} if len(names) > 2 else {}


#: the Kronecker shape rule a frontier uses unless told otherwise (docs/design.md, D11)
KRON_SHAPE_RULE = "square_channels"


def family_spec(family: str, layers: dict[str, nn.Module], budget_key: str,
                budget: float, kron_shape_rule: str = KRON_SHAPE_RULE
                ) -> dict[str, dict[str, Any]]:
    """The ``layers`` spec of ``family`` at one budget: every layer it applies to, each at
    ``budget_key`` (param_ratio or mac_ratio) = ``budget``; Kronecker layers with
    ``shape_rule: kron_shape_rule`` (written into the spec, so a record made under another rule
    is stale)."""
    if family not in FAMILY_KINDS:
        raise ValueError(f"unknown family {family!r}; families: {', '.join(FAMILY_KINDS)}")
    conv_kind, linear_kind = FAMILY_KINDS[family]
    spec = {}
    for name, layer in layers.items():
        kind = linear_kind if isinstance(layer, nn.Linear) else conv_kind
        if kind is not None:
            spec[name] = {"kind": kind, budget_key: float(budget)}
            if kind == "kron":
                spec[name]["shape_rule"] = kron_shape_rule
    return spec


def feasible(cfg: Any, spec: dict[str, dict[str, Any]]) -> str | None:
    """None when surgery can build ``spec`` on the net, else why not (one line)."""
    from kron.models.surgery import apply_surgery

    if not spec:
        return "no layer of this family to replace"
    net, shape = net_from_config(cfg)
    try:
        apply_surgery(net, spec, shape, strict=True)  # a layer left dense: not this budget
    except ValueError as err:
        return str(err).splitlines()[0]
    return None


def point_id(family: str, budget_key: str, budget: float) -> str:
    """A file- and Hydra-safe row id, e.g. ``kron_p0_05`` (``m`` for a MAC budget)."""
    return f"{family}_{budget_key[0]}" + slug(f"{budget:g}")


def frontier_points(cfg: Any, chosen: dict[str, nn.Module], families: Sequence[str],
                    budgets: Sequence[float], budget_key: str = "param_ratio",
                    kron_shape_rule: str = KRON_SHAPE_RULE) -> tuple[list[Point], list[str]]:
    """Each family at each budget (ascending) that surgery can build on the net ``cfg``
    makes, and the points left out, each with its reason."""
    points, skipped = [], []
    for family in families:
        for b in sorted(budgets):
            spec = family_spec(family, chosen, budget_key, b, kron_shape_rule)
            rid = point_id(family, budget_key, b)
            why = feasible(cfg, spec)
            if why is not None:
                skipped.append(f"{rid}: {why}")
                continue
            points.append(Point(rid, family, f"{family} {budget_key.replace('_', ' ')} {b:g}",
                                spec, f"{family}, every swapped layer at {budget_key} <= {b:g}",
                                float(b)))
    return points, skipped


def _check_budgets(budget_key: str, budgets: Sequence[float]) -> None:
    """A one-line error for a budget kind other than param_ratio/mac_ratio or a budget <= 0."""
    if budget_key not in ("param_ratio", "mac_ratio"):
        raise ValueError(f"budget must be param_ratio or mac_ratio, got {budget_key!r}")
    for b in budgets:
        if not b > 0:
            raise ValueError(f"budgets must be > 0, got {b}")


def write_frontier(target: str, families: Sequence[str], budgets: Sequence[float],
                   budget_key: str = "param_ratio", overrides: Sequence[str] = (),
                   layers: Sequence[str] | None = None, out: str | Path | None = None,
                   seeds: int = 1, kron_shape_rule: str = KRON_SHAPE_RULE
                   ) -> tuple[Table, list[str]]:
    """Write the frontier's presets and ``table.yaml``; return the table and the
    points left out (infeasible budgets, each with its reason)."""
    _check_budgets(budget_key, budgets)
    check_shape_rule(kron_shape_rule, "kron shape rule")
    name, base_over, base_exp = base_overrides(target, overrides)
    cfg = base_config(base_over, base_exp)
    chosen = swappable(cfg, layers)
    points, skipped = frontier_points(cfg, chosen, families, budgets, budget_key,
                                      kron_shape_rule)
    if not points:
        raise ValueError("no family fits any budget: " + "; ".join(skipped))
    gen = GeneratedTable.at(f"frontier_{name}", out, "frontier")
    # the base preset as an option of the preset group (its own relative defaults then
    # resolve as when it is chosen on the command line); a model: the dense layers
    defaults = [{"/preset@_here_": base_exp}] if base_exp else DENSE_DEFAULTS
    dense = base_exp or gen.write_preset("dense", DENSE_DEFAULTS, {},
                                             "the dense net (reference row)")
    rows = [{"id": "dense", "preset": dense, "label": "dense", "family": "dense"},
            *gen.write_points(points, defaults)]
    return gen.write_table({
        "name": gen.name, "title": f"Frontier of {name}: error against cost at matched "
                                   f"{budget_key.replace('_', ' ')}s",
        "reference": "dense", "seeds": int(seeds), "headline": False,
        "overrides": [*base_over, gen.searchpath],
        "reconstruction": [
            f"Generated by kron-tables frontier from {target!r} with overrides "
            f"{' '.join(overrides) or '(none)'}; swapped layers: {', '.join(chosen)}; each at "
            f"the row's {budget_key} of its dense self (shapes/ranks by surgery's budget "
            "targets)."] + [f"Left out (infeasible): {s}" for s in skipped],
        "rows": rows,
    }), skipped


def best_per_budget(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each budget: the family with the lowest mean error, the runner-up, the lead (in
    points) and whether the two differ by more than their seeds' spread."""
    budgets = sorted({m["budget"] for m in rows if m.get("budget") is not None})
    out = []
    for b in budgets:
        have = sorted((m for m in rows if m.get("budget") == b and m["test_err1"] is not None),
                      key=lambda m: m["test_err1"].mean)
        if not have:
            continue
        best, second = have[0], (have[1] if len(have) > 1 else None)
        lead = None if second is None else second["test_err1"].mean - best["test_err1"].mean
        out.append({"budget": b, "best": best, "second": second, "lead": lead,
                    "separated": second is not None
                    and separated(best["test_err1"], second["test_err1"])})
    return out


def _err(s: Stat | None) -> str:
    from kron.tables.render import num

    return num(s)


def frontier_markdown(table: Table, rows: Sequence[dict[str, Any]]) -> str:
    """The best family at each budget, as Markdown."""
    from kron.tables.render import human

    lines = [f"## {table.title}: best family per budget", "",
             "| Budget | Best family | Error (%) | Params | Runner-up | Error (%) | Lead "
             "(points) | Lead > spread |",
             "|--:|:--|--:|--:|:--|--:|--:|:--|"]
    for p in best_per_budget(rows):
        best, second = p["best"], p["second"]
        if second is None:
            verdict = "only one family"
        elif min(best["test_err1"].n, second["test_err1"].n) < 2:
            verdict = "unknown (one seed: no spread)"
        else:
            verdict = "yes" if p["separated"] else "no"
        lines.append(" | ".join([
            f"| {p['budget']:g}", best["family"], _err(best["test_err1"]),
            human(best["params"].mean if best["params"] else None),
            second["family"] if second else "–",
            _err(second["test_err1"]) if second else "–",
            "–" if p["lead"] is None else f"{p['lead']:.2f}", verdict]) + " |")
    lines += ["", "Lead: runner-up's mean error minus the best's. Lead > spread: the two "
              "families' mean ± std error intervals do not overlap (two or more seeds each)."]
    return "\n".join(lines) + "\n"
