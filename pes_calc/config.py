"""One config layer for YAML-shaped settings: training, active learning and
architecture hyperparameters all read, check and fill defaults the same way.

Each section declares its defaults once, as a dict; `with_defaults` (flat sections)
and `merge_hypers` (nested hyperparameters) check the given keys against it, so a
typo is an error that says what was meant instead of silently falling back.
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

__all__ = ["ConfigError", "check_keys", "load_yaml", "merge_hypers", "with_defaults"]


class ConfigError(ValueError):
    """A config (or hyperparameters) that cannot be run as written."""


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The YAML mapping at ``path``. Relative paths inside it are read from the
    current directory (as metatrain and nequip do), not from the file's folder."""
    try:
        with open(path) as handle:
            config = yaml.safe_load(handle)
    except OSError as error:
        raise ConfigError(f"cannot read the config {path}: {error.strerror}") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not a YAML mapping")
    return config


def check_keys(given: Iterable[str], known: Iterable[str], where: str) -> None:
    """Raise `ConfigError` for a key of ``given`` not in ``known``, suggesting the
    nearest known one (``where``: the section's name in the message)."""
    known = sorted(str(key) for key in known)
    unknown = sorted(set(map(str, given)) - set(known))
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        if close:
            hints.append(f"{key!r}: did you mean {close[0]!r}?")
    message = f"unknown {where} keys {unknown}"
    if hints:
        message += f" ({'; '.join(hints)})"
    raise ConfigError(f"{message}; known: {', '.join(known)}")


def with_defaults(
    given: Mapping[str, Any] | None, defaults: Mapping[str, Any], where: str
) -> dict[str, Any]:
    """A flat section: ``given`` over ``defaults`` (both deep-copied), keys checked."""
    given = {} if given is None else given
    if not isinstance(given, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {given!r}")
    check_keys(given, defaults, where)
    return {**copy.deepcopy(dict(defaults)), **copy.deepcopy(dict(given))}


def merge_hypers(defaults: Mapping, given: Mapping, where: str = "") -> dict:
    """Deep-merge ``given`` over ``defaults``: nested mappings merge key by key,
    every other value replaces the default; unknown keys raise `ConfigError`."""
    check_keys(
        given,
        defaults,
        f"{where.rstrip('.')} hyperparameter" if where else "hyperparameter",
    )
    merged = copy.deepcopy(dict(defaults))
    for key, value in given.items():
        if isinstance(defaults[key], Mapping) and isinstance(value, Mapping):
            merged[key] = merge_hypers(defaults[key], value, f"{where}{key}.")
        else:
            merged[key] = copy.deepcopy(value)
    return merged
