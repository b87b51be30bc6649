"""The training config: defaults, `load_config` and `normalise_config` (defaults
filled in, every key and value checked before any data is read).

Built on the shared config layer `pes_calc.config`; its `ConfigError` is raised
here as `TrainingConfigError`, with the same message.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Mapping
from typing import Any

from pes_calc.config import ConfigError, check_keys, load_yaml, with_defaults
from pes_calc.train.llpr import CALIBRATION_METHODS, ENERGY_UNCERTAINTIES

__all__ = [
    "BEST_MODEL_METRICS",
    "DATA_KEYS",
    "LLPR_MODEL_DEFAULTS",
    "LLPR_TRAINING_DEFAULTS",
    "TOP_LEVEL_KEYS",
    "TRAINING_DEFAULTS",
    "TrainingConfigError",
    "load_config",
    "normalise_config",
]

# metatrain's names; checkpoints and validation every epoch since both are cheap
TRAINING_DEFAULTS: dict[str, Any] = {
    "batch_size": 8,
    "num_epochs": 100,
    "learning_rate": 1e-3,
    "warmup_fraction": 0.01,
    "weight_decay": 0.0,
    "grad_clip_norm": None,
    "scale_targets": True,
    "remove_composition_contribution": True,
    "fixed_composition_weights": {},
    # metatrain's names: {energy: {Cu: s}} (or by atomic number) fixes the per-type
    # energy scales instead of fitting them to the forces
    "fixed_scaling_weights": {},
    # accepted for metatrain configs; here MAEs are always logged, the one target
    # (energy) has one block, energy errors are reported per atom and per
    # structure, and batches are built in-process (no DataLoader workers)
    "log_mae": False,
    "log_separate_blocks": False,
    "per_structure_targets": [],
    "num_workers": None,
    "log_interval": 1,
    "checkpoint_interval": 1,
    "best_model_metric": "rmse_prod",
    "loss": None,
    "finetune": None,
    "distributed": False,
    # nequip's and MACE's name: null, or d in (0, 1) for an exponential moving
    # average of the weights (pes_calc.train.ema), validated, selected and saved
    "ema_decay": None,
}
# the llpr wrapper's trainer (metatrain's names and defaults); num_epochs null means
# covariance + calibration only, no ensemble-weight training
LLPR_TRAINING_DEFAULTS: dict[str, Any] = {
    "model_checkpoint": None,
    "batch_size": 8,
    "regularizer": None,
    "calibration_method": "absolute_residuals",
    # the energy σ after ensemble training: analytic α ‖L⁻¹ g_s‖, a × the trained
    # members' spread, or auto (the lower validation NLL)
    "energy_uncertainty": "auto",
    "loss": "ensemble_nll",
    "num_epochs": None,
    "train_all_parameters": False,
    "warmup_fraction": 0.01,
    "learning_rate": 3e-4,
    "weight_decay": None,
    "log_interval": 1,
    "checkpoint_interval": 100,
    "best_model_metric": "loss",
    "grad_clip_norm": 1.0,
    "distributed": False,
}
LLPR_MODEL_DEFAULTS: dict[str, Any] = {"num_ensemble_members": {}}
DATA_KEYS = {
    "train",
    "val",
    "test",
    "energy_key",
    "forces_key",
    "stress_key",
    "isolated_atom_energies",
}
TOP_LEVEL_KEYS = {"seed", "device", "data", "architecture"}
ARCHITECTURE_KEYS = ("name", "model", "training", "species")
BEST_MODEL_METRICS = ("rmse_prod", "mae_prod", "loss")


class TrainingConfigError(ConfigError):
    """A training config that cannot be run as written."""


@contextlib.contextmanager
def _as_training_error() -> Iterator[None]:
    """The shared layer's `ConfigError` raised as `TrainingConfigError`."""
    try:
        yield
    except TrainingConfigError:
        raise
    except ConfigError as error:
        raise TrainingConfigError(str(error)) from error


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML training config; relative data paths are read from the current
    directory, as metatrain does."""
    with _as_training_error():
        return load_yaml(path)


def normalise_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with defaults filled in; unknown keys are errors."""
    with _as_training_error():
        return _normalise(copy.deepcopy(dict(config)))


def _normalise(config: dict[str, Any]) -> dict[str, Any]:
    check_keys(config, TOP_LEVEL_KEYS, "top-level")
    for required in ("data", "architecture"):
        if required not in config:
            raise TrainingConfigError(f"the config needs a {required!r} section")
    data = dict(config["data"])
    check_keys(data, DATA_KEYS, "data")
    for required in ("train", "val"):
        if required not in data:
            raise TrainingConfigError(f"data needs a {required!r} file")
    architecture = dict(config["architecture"])
    if "name" not in architecture:
        raise TrainingConfigError("the architecture section needs a 'name'")
    check_keys(architecture, ARCHITECTURE_KEYS, "architecture")
    is_llpr = architecture["name"] == "llpr"
    defaults = LLPR_TRAINING_DEFAULTS if is_llpr else TRAINING_DEFAULTS
    training = with_defaults(architecture.get("training") or {}, defaults, "training")
    if training["best_model_metric"] not in BEST_MODEL_METRICS:
        raise TrainingConfigError(
            f"best_model_metric must be one of {BEST_MODEL_METRICS}, "
            f"got {training['best_model_metric']!r}"
        )
    for name in ("batch_size", "num_epochs", "log_interval", "checkpoint_interval"):
        if is_llpr and name == "num_epochs" and training[name] is None:
            continue  # llpr: no ensemble training, covariance and calibration only
        if not isinstance(training[name], int) or training[name] < 1:
            raise TrainingConfigError(f"{name} must be a positive integer")
    if not is_llpr:
        _check_ema_decay(training["ema_decay"])
    architecture["model"] = dict(architecture.get("model") or {})
    if is_llpr:
        architecture["model"] = _llpr_model_section(architecture["model"], training)
    architecture["training"] = training
    return {
        "seed": int(config.get("seed", 0)),
        "device": str(config.get("device", "cpu")),
        "data": data,
        "architecture": architecture,
    }


def _check_ema_decay(decay: Any) -> None:
    """``ema_decay``: null (no averaging) or a number strictly between 0 and 1."""
    is_number = isinstance(decay, (int, float)) and not isinstance(decay, bool)
    if decay is not None and not (is_number and 0.0 < decay < 1.0):
        raise TrainingConfigError(
            "ema_decay must be null (no weight averaging) or a number between 0 "
            f"and 1, exclusive (e.g. 0.99), got {decay!r}"
        )


def _llpr_model_section(
    model: dict[str, Any], training: dict[str, Any]
) -> dict[str, Any]:
    """The llpr ``model`` section checked: ``num_ensemble_members: {energy: M}``."""
    check_keys(model, LLPR_MODEL_DEFAULTS, "llpr model")
    members = model.get("num_ensemble_members", {}) or {}
    if not isinstance(members, Mapping) or set(members) - {"energy"}:
        raise TrainingConfigError(
            "num_ensemble_members must map targets to member counts, e.g. "
            "{energy: 16}; energy is the one target (forces follow from it)"
        )
    count = members.get("energy", 0)
    if not isinstance(count, int) or count < 0:
        raise TrainingConfigError("num_ensemble_members.energy must be an integer ≥ 0")
    if not training["model_checkpoint"]:
        raise TrainingConfigError(
            "an llpr config needs training.model_checkpoint: the trained model to wrap"
        )
    if training["num_epochs"] is not None and count < 2:
        raise TrainingConfigError(
            "ensemble training (num_epochs set) needs num_ensemble_members.energy ≥ 2"
        )
    if training["distributed"]:
        raise TrainingConfigError(
            "llpr fitting runs in one process (distributed: false)"
        )
    if training["calibration_method"] not in CALIBRATION_METHODS:
        raise TrainingConfigError(
            f"unknown calibration_method {training['calibration_method']!r}; choose "
            f"from {', '.join(CALIBRATION_METHODS)}"
        )
    _check_energy_uncertainty(training["energy_uncertainty"], training["num_epochs"])
    return {"num_ensemble_members": {"energy": count}}


def _check_energy_uncertainty(source: Any, num_epochs: int | None) -> None:
    """``energy_uncertainty``: auto, analytic or ensemble; the ensemble's spread is
    a choice only once the ensemble is trained (num_epochs set)."""
    choices = ("auto", *ENERGY_UNCERTAINTIES)
    if source not in choices:
        raise TrainingConfigError(
            f"unknown energy_uncertainty {source!r}; choose from {', '.join(choices)}"
        )
    if source == "ensemble" and num_epochs is None:
        raise TrainingConfigError(
            "energy_uncertainty: ensemble needs ensemble training (num_epochs set); "
            "without it the energy σ is the analytic one"
        )
