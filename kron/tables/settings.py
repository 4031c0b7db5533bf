"""What a table's runs actually ran, read back from their records.

A table declares its rows for the full-scale experiment (the real dataset, the paper-sized
schedule), but a page or a user may run it with overrides (synthetic data, a narrower net,
fewer epochs). The rendered table must say which setting its numbers come from, so this module
reads the composed config every ``results.json`` carries and summarises the table-wide part of
it in one line: data, net width, schedule and optimiser. A value that differs between runs is
shown with all its values ("a or b"), never silently as the first one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kron.tables.results import RunResult

_MISSING = object()


def _get(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return _MISSING
        node = node[key]
    return node


def _values(configs: Sequence[dict[str, Any]], dotted: str) -> list[Any]:
    """The distinct values of ``dotted`` over the configs that have it, in first-seen order."""
    out: list[Any] = []
    for c in configs:
        v = _get(c, dotted)
        if v is not _MISSING and v not in out:
            out.append(v)
    return out


def _show(values: list[Any], fmt: str = "{}") -> str | None:
    """One value as ``fmt``; several as "a or b"; none as None."""
    if not values:
        return None
    return " or ".join(fmt.format(v) for v in values)


def _data(configs: Sequence[dict[str, Any]]) -> str | None:
    names = _values(configs, "data.name")
    if not names:
        return None
    name = _show(names)
    if any(isinstance(s, dict) for s in _values(configs, "data.synth")):
        if not all("synth" in str(n) for n in names):
            name = f"synthetic {name}"
        level = _show(_values(configs, "data.synth.difficulty"))
        n_train = _show(_values(configs, "data.synth.n_train"), "{:,}")
        n_test = _show(_values(configs, "data.synth.n_test"), "{:,}")
        sizes = n_train and f"{n_train} train / {n_test} test"
        detail = ", ".join(p for p in (level and f"{level} level", sizes) if p)
    else:
        detail = _show(_values(configs, "data.path"))
    classes = _show(_values(configs, "data.num_classes"), "{:,}")
    size, chans = _values(configs, "data.input_size"), _values(configs, "data.in_channels")
    shape = f"{_show(size, '{0}x{0}')}x{_show(chans)} inputs" if size and chans else None
    tail = ", ".join(p for p in (classes and f"{classes} classes", shape) if p)
    return f"data {name}" + (f" ({detail})" if detail else "") + (f", {tail}" if tail else "")


def _net(configs: Sequence[dict[str, Any]]) -> str | None:
    names = _values(configs, "model.name")
    if not names:
        return None
    width = _show(_values(configs, "model.width"), "{:g}")
    return f"net {_show(names)}" + (f" at width {width}" if width else "")


def _schedule(configs: Sequence[dict[str, Any]]) -> str | None:
    epochs, batch = _values(configs, "epochs"), _values(configs, "batch_size")
    parts = [epochs and f"{_show(epochs)} epochs", batch and f"batch {_show(batch)}"]
    return ", ".join(p for p in parts if p) or None


def _optimiser(configs: Sequence[dict[str, Any]]) -> str | None:
    targets = _values(configs, "optimizer._target_")
    if not targets:
        return None
    name = _show([str(t).rsplit(".", 1)[-1] for t in targets])
    parts = [f"{name} lr {_show(_values(configs, 'optimizer.lr'), '{:g}')}"]
    momentum = _values(configs, "optimizer.momentum")
    if momentum:
        nesterov = _values(configs, "optimizer.nesterov") == [True]
        parts.append(("Nesterov momentum " if nesterov else "momentum ")
                     + _show(momentum, "{:g}"))
    decay = _values(configs, "optimizer.weight_decay")
    if decay:
        parts.append(f"weight decay {_show(decay, '{:g}')}")
    sched = _values(configs, "scheduler.name")
    if sched:
        warm = _values(configs, "scheduler.warmup_steps")
        parts.append(f"{_show(sched)} schedule"
                     + (f" after {_show(warm)} warm-up steps" if warm and warm != [0] else ""))
    clip = _values(configs, "grad_clip")
    if clip:
        parts.append("no gradient clipping" if clip in ([0], [None])  # [0] == [0.0]
                     else f"gradient clipping at {_show(clip, '{:g}')}")
    return ", ".join(parts)


def settings_line(results: Sequence[RunResult]) -> str | None:
    """"Ran: ..." for the finished runs of a table (None when no record carries a config)."""
    ok = [r for r in results if r.ok]
    configs = [r.data["config"] for r in ok if isinstance(r.data.get("config"), dict)]
    if not configs:
        return None
    parts = [p for p in (_data(configs), _net(configs), _schedule(configs),
                         _optimiser(configs)) if p]
    seeds = sorted({r.seed for r in ok})
    parts.append(("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds)))
    return "Ran (read from the run records): " + "; ".join(parts) + "."
