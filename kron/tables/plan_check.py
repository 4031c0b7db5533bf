"""Whether a run record's layers are the layers its config builds today.

A record is compared with today's config key by key (:func:`kron.tables.run.stale`), but a
budget entry (``{kind: kron, param_ratio: 0.1}``) leaves the chosen shape or rank to code: a
change to a shape rule or a rank search would leave such a record looking current. So the
surgery its config plans today (on a fresh net, scratch init: the choice does not depend on the
weights) is compared with the surgery rows the record holds: layer, kind, setting and status
(docs/design.md, D9).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

#: the spec keys that do not change which layer is built (how it is initialised or executed)
_IGNORED = ("init", "implementation")


def _row_key(row: Mapping[str, Any]) -> tuple[str, str, str, str]:
    return (str(row["name"]), str(row["kind"]), str(row["detail"]), str(row["status"]))


@lru_cache(maxsize=64)
def _planned(key: str) -> tuple[tuple[str, str, str, str], ...] | None:
    from kron.models import build_model_from_config
    from kron.models.surgery import plan_surgery

    model, layers, num_classes, shape = json.loads(key)
    spec = {p: {k: v for k, v in (e or {}).items() if k not in _IGNORED}
            for p, e in layers.items()}
    try:
        net = build_model_from_config(model, num_classes, shape[0], shape[1])
        plan = plan_surgery(net, spec, (1, *shape))
    except Exception:  # noqa: BLE001 - a net or spec that does not build here: cannot tell
        return None
    return tuple(_row_key(r.as_dict()) for r in plan.rows)


def planned_layers(config: Mapping[str, Any]) -> tuple[tuple[str, str, str, str], ...] | None:
    """``(layer, kind, setting, status)`` of every layer the resolved training ``config``'s
    surgery matches today, or None when its net cannot be built here."""
    from kron.recipe.settings import ModelSettings

    try:
        s = ModelSettings.of(config)
    except (KeyError, TypeError, ValueError):
        return None
    return _planned(json.dumps([s.model, s.layers, s.num_classes, list(s.shape)],
                               sort_keys=True, default=str))


def layers_changed(config: Mapping[str, Any], recorded: Sequence[Mapping[str, Any]] | None
                   ) -> bool:
    """True when ``config`` plans other layers today than the record's surgery rows say
    (another shape, rank or kind; a layer now left dense). A record without rows, or a net
    that does not build here, is not judged (False)."""
    if not isinstance(recorded, list):
        return False
    try:
        saved = tuple(_row_key(r) for r in recorded)
    except (KeyError, TypeError):
        return False
    now = planned_layers(config)
    return now is not None and now != saved
