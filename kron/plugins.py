"""Importing the module a config entry names (``module:``) so that it registers itself.

A dataset or a layer kind from outside kron is one module plus one YAML file whose entry names
that module (docs/notes/kinds.md); both registries import it through :func:`import_plugin`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any


def import_plugin(module: Any, where: str, error: type[Exception]) -> None:
    """Import ``module``; one that cannot be imported raises ``error`` with one line naming
    the config key ``<where>.module`` and the fix."""
    try:
        import_module(str(module))
    except ImportError as err:
        raise error(f"{where}.module: cannot import {module!r} ({err}); put the folder "
                    "holding it on PYTHONPATH") from None
