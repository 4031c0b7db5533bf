"""Check ``kron.train``'s command line before Hydra runs, so a mistake is one line.

Hydra reports an unknown key over several lines, and a value of the wrong type only fails
deep inside torch. :func:`cli_config_error` composes the config the overrides ask for (a sweep
contributes its first value) and checks it against :mod:`kron.config_schema`. Command lines it
cannot judge alone (another config name or folder, a sweep it cannot expand) are left to Hydra
and to the check every job makes at start.
"""

from __future__ import annotations

from collections.abc import Sequence

CONFIG_FLAGS = ("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir")


def _first_values(overrides: list[str]) -> list[str] | None:
    """Each override with a sweep replaced by its first value; None if one cannot be."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for text, ov in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        if not ov.is_sweep_override():
            out.append(text)
            continue
        try:
            first = next(iter(ov.sweep_string_iterator()))
        except Exception:  # an interval sweep or other kind without listed values
            return None
        out.append(f"{ov.get_key_element()}={first}")
    return out


def _hydra_problem(err: Exception, overrides: list[str]) -> str:
    """One line for an error Hydra raised while composing."""
    text = " ".join(str(err).split())
    if "Could not override" in text:
        key = text.split("'")[1]
        return (f"{key}: unknown key (no such key in the config; check the spelling, or add a "
                f"new one with +{key}=...)")
    return text.split(" full_key:")[0]


def cli_config_error(argv: Sequence[str]) -> str | None:
    """The first problem with the overrides in ``argv`` as one line, or None."""
    if any(a.split("=")[0] in CONFIG_FLAGS for a in argv):
        return None
    overrides = [a for a in argv if "=" in a and not a.startswith("-")
                 and not a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    if not overrides:
        return None
    # a config folder added on the command line (generated tables, a user's own configs)
    # holds options the overrides may choose: compose with it
    overrides += [a for a in argv if a.lstrip("+~").startswith("hydra.searchpath=")]
    old = [o for o in overrides if o.split("=")[0].lstrip("+~").split("@")[0] == "experiment"]
    if old:  # the group's old name (docs/notes/names.md)
        return (f"{old[0]}: the config group 'experiment' is now 'preset'; use "
                f"preset={old[0].split('=', 1)[1]}")
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from kron.config_compose import compose_train
    from kron.config_schema import ConfigError, check_train_config

    try:
        firsts = _first_values(overrides)
        if firsts is None:
            return None
        check_train_config(OmegaConf.to_container(compose_train(firsts), resolve=True))
    except ConfigError as err:
        return str(err)
    except (HydraException, OmegaConfBaseException) as err:
        return _hydra_problem(err, overrides)
    return None
