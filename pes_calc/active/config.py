"""The active-learning config: `DEFAULTS`, `load_config`, `normalise` (defaults
filled in and every value checked before hours of training), `reference_factory`,
and the ``pes-calc train`` configs each round's training stages get."""

from __future__ import annotations

import contextlib
import copy
import glob
import importlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

from pes_calc.config import ConfigError, check_keys, load_yaml, with_defaults
from pes_calc.md import ENSEMBLES, UNCERTAINTY_MEASURES
from pes_calc.train import TrainingConfigError, normalise_config

__all__ = [
    "DEFAULTS",
    "RETRAIN_MODES",
    "TRAINING_KEYS",
    "ActiveLearningConfigError",
    "base_config",
    "llpr_config",
    "load_config",
    "normalise",
    "reference_factory",
    "structure_files",
]

DEFAULTS: dict[str, dict[str, Any]] = {
    "reference": {"calculator": None, "kwargs": {}},
    "retrain": {"mode": "finetune", "training": {}},
    "llpr": {"model": {"num_ensemble_members": {"energy": 8}}, "training": {}},
    "md": {
        "structures": None,
        "temperatures": None,
        "steps": 1000,
        "timestep": 1.0,
        "ensemble": "nvt",
        "interval": 10,
        "thermostat": "langevin",
        "friction": 0.01,
        "log_interval": 10,
        "stop_uncertainty": None,
    },
    "selection": {
        "max_uncertainty": None,
        "measure": "forces",
        "max_per_round": 20,
        "max_per_run": None,
        "min_separation_steps": 50,
        "duplicate_tolerance": 0.01,
    },
    "budget": {"max_rounds": 5, "max_labels": None},
}
TRAINING_KEYS = ("seed", "device", "data", "architecture")
RETRAIN_MODES = ("finetune", "scratch")


class ActiveLearningConfigError(TrainingConfigError):
    """An active-learning config that cannot be run as written."""


@contextlib.contextmanager
def _as_active_learning_error() -> Iterator[None]:
    """The shared layer's `ConfigError` raised as ours, with the same message."""
    try:
        yield
    except ConfigError as error:
        raise ActiveLearningConfigError(str(error)) from error


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """The YAML config at ``path``; relative paths in it are read from the current
    directory, as for ``pes-calc train``."""
    with _as_active_learning_error():
        return load_yaml(path)


def normalise(given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` with `DEFAULTS` filled in and checked; unknown keys are errors."""
    config: dict[str, Any] = copy.deepcopy(dict(given))
    with _as_active_learning_error():
        check_keys(config, set(TRAINING_KEYS) | set(DEFAULTS), "top-level")
    if isinstance(config.get("retrain"), str):
        config["retrain"] = {"mode": config["retrain"]}
    out: dict[str, Any] = {
        "seed": int(config.get("seed", 0)),
        "device": str(config.get("device", "cpu")),
    }
    for name in ("data", "architecture"):
        if not isinstance(config.get(name), Mapping):
            raise ActiveLearningConfigError(f"the config needs a {name!r} section")
        out[name] = dict(config[name])
    for name, defaults in DEFAULTS.items():
        with _as_active_learning_error():
            out[name] = with_defaults(config.get(name) or {}, defaults, name)
    _check(out)
    return json.loads(json.dumps(out))  # plain lists and dicts, as YAML writes them


# values that must be > 0: (section, key, an integer?, may be null?)
_POSITIVE = (
    ("md", "steps", True, False),
    ("md", "interval", True, False),
    ("md", "log_interval", True, False),
    ("md", "timestep", False, False),
    ("md", "stop_uncertainty", False, True),
    ("selection", "max_uncertainty", False, False),
    ("selection", "max_per_round", True, False),
    ("selection", "max_per_run", True, True),
    ("selection", "min_separation_steps", True, False),
    ("budget", "max_rounds", True, False),
    ("budget", "max_labels", True, True),
)


def _check(config: dict[str, Any]) -> None:
    """Errors now rather than after hours of training."""
    md, selection = config["md"], config["selection"]
    reference_factory(config["reference"]["calculator"])
    if config["retrain"]["mode"] not in RETRAIN_MODES:
        raise ActiveLearningConfigError(f"retrain.mode must be one of {RETRAIN_MODES}")
    # the trainer's own checks, on the configs it will get
    for where, trainer_config in (
        ("", base_config(config, 0, "train.xyz", "base.safetensors")),
        ("retrain: ", base_config(config, 1, "train.xyz", "base.safetensors")),
        ("llpr: ", llpr_config(config, "train.xyz", "base.safetensors")),
    ):
        try:
            normalise_config(trainer_config)
        except TrainingConfigError as error:
            raise ActiveLearningConfigError(f"{where}{error}") from None
    for section, key, integer, nullable in _POSITIVE:
        value = config[section][key]
        kinds = (int,) if integer else (int, float)
        if (value is None and nullable) or (
            isinstance(value, kinds) and not isinstance(value, bool) and value > 0
        ):
            continue
        raise ActiveLearningConfigError(
            f"{section}.{key} must be {'an integer' if integer else 'a number'} > 0"
            f"{' or null' if nullable else ''}, got {value!r}"
        )
    if selection["measure"] not in UNCERTAINTY_MEASURES:
        raise ActiveLearningConfigError(
            f"selection.measure must be one of {tuple(UNCERTAINTY_MEASURES)}"
        )
    members = config["llpr"]["model"].get("num_ensemble_members", {}).get("energy", 0)
    if selection["measure"] == "forces" and not members:
        raise ActiveLearningConfigError(
            "selection.measure forces needs llpr.model.num_ensemble_members.energy ≥ 1"
        )
    if md["ensemble"] not in ENSEMBLES:
        raise ActiveLearningConfigError(f"md.ensemble must be one of {ENSEMBLES}")
    temperatures = md["temperatures"]
    if (
        not isinstance(temperatures, list)
        or not temperatures
        or not all(_is_number(t) and t >= 0 for t in temperatures)
    ):
        raise ActiveLearningConfigError("md.temperatures must be a list of K ≥ 0")
    if not isinstance(md["structures"], list) or not md["structures"]:
        raise ActiveLearningConfigError("md.structures must be a list of files")
    structure_files(md["structures"])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def reference_factory(spec: Any) -> Any:
    """The class (or function) ``"package.module:Name"`` (or ``"...module.Name"``).

    >>> reference_factory("ase.calculators.emt:EMT")
    <class 'ase.calculators.emt.EMT'>
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ActiveLearningConfigError(
            "reference.calculator must name an ASE calculator class, e.g. "
            "'ase.calculators.emt:EMT' or 'tblite.ase:TBLite'"
        )
    module_name, _, name = spec.partition(":") if ":" in spec else spec.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ActiveLearningConfigError(
            f"reference.calculator {spec!r}: cannot import {module_name!r} ({error}); "
            "install the package that provides it"
        ) from error
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ActiveLearningConfigError(
            f"reference.calculator {spec!r}: module {module_name} has no class {name!r}"
        )
    return factory


def structure_files(patterns: list[str]) -> list[str]:
    """The files ``md.structures`` names: each glob pattern's matches, sorted; a
    pattern without a match is an error."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(pattern)))
        if not matches:
            raise ActiveLearningConfigError(f"md.structures: no file matches {pattern}")
        files += matches
    return files


def base_config(
    config: Mapping[str, Any],
    round_: int,
    train_file: str | os.PathLike,
    previous_model: str | os.PathLike,
) -> dict[str, Any]:
    """The ``pes-calc train`` config of round ``round_`` (no test set: the LLPR
    wrapper of the same model is the one scored); rounds ≥ 1 get ``retrain``'s
    training overrides and, to fine-tune, ``previous_model``."""
    section = copy.deepcopy(config["architecture"])
    training = dict(section.get("training") or {})
    if round_ > 0:
        training.update(config["retrain"]["training"])
        if config["retrain"]["mode"] == "finetune":
            training["finetune"] = {"read_from": str(previous_model)}
    section["training"] = training
    data = {k: v for k, v in config["data"].items() if k != "test"}
    return {
        "seed": config["seed"],
        "device": config["device"],
        "data": {**data, "train": str(train_file)},
        "architecture": section,
    }


def llpr_config(
    config: Mapping[str, Any],
    train_file: str | os.PathLike,
    base_model: str | os.PathLike,
) -> dict[str, Any]:
    """The ``pes-calc train`` config of the llpr run wrapping ``base_model``."""
    llpr = copy.deepcopy(config["llpr"])
    llpr["training"]["model_checkpoint"] = str(base_model)
    return {
        "seed": config["seed"],
        "device": config["device"],
        "data": {**config["data"], "train": str(train_file)},
        "architecture": {"name": "llpr", **llpr},
    }
