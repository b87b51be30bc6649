"""What a training run writes to its directory, and reads back to resume.

- ``checkpoint.pt``: config, weights, best weights, optimizer, scheduler, weight
  averages (``ema_decay``) and loop state after an epoch (`write_checkpoint`;
  `read_checkpoint`, and `resume` to load one into a run);
- ``model.safetensors``: the best weights with a training record (`save_best`);
- ``train.csv``: one row per epoch (`read_log`, `write_log`).

Every file is written through `pes_calc.files.atomic_write`, so an interruption
leaves the previous version, never half a file.
"""

from __future__ import annotations

import copy
import csv
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pes_calc.files import atomic_write
from pes_calc.io import save_model
from pes_calc.llpr import LLPR
from pes_calc.potential import Potential
from pes_calc.train.config import TrainingConfigError
from pes_calc.train.ema import WeightEMA

__all__ = [
    "CHECKPOINT_FORMAT",
    "read_checkpoint",
    "read_log",
    "resume",
    "save_best",
    "write_checkpoint",
    "write_log",
]

CHECKPOINT_FORMAT = "pes_calc.checkpoint"


def write_checkpoint(
    path: Path,
    config: Mapping[str, Any],
    model: nn.Module,
    best_state: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: Mapping[str, Any],
    ema: WeightEMA | None = None,
) -> None:
    """Everything a resumed run needs to retrace an uninterrupted one."""
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "config": config,
        "model": model.state_dict(),
        "best_model": best_state,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": state,
        "ema": None if ema is None else ema.state_dict(),
    }
    atomic_write(path, lambda temporary: torch.save(checkpoint, temporary))


def read_checkpoint(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint at ``path``, checked to belong to a run of ``config``."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise TrainingConfigError(
            f"{path} cannot be read ({error}); delete it to start the run afresh"
        ) from error
    is_checkpoint = isinstance(checkpoint, dict) and (
        checkpoint.get("format") == CHECKPOINT_FORMAT
    )
    if not is_checkpoint:
        raise TrainingConfigError(f"{path} is not a pes_calc training checkpoint")
    previous = _comparable(checkpoint["config"])
    current = _comparable(config)
    if previous != current:
        raise TrainingConfigError(
            f"{path.parent} holds a run with a different config; use another output "
            "directory or delete its checkpoint.pt to start again"
        )
    return checkpoint


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The parts of a config a resumed run must share with the checkpoint's: not
    num_epochs (more may be asked for), and file paths compared as absolute paths
    (so "data/x.xyz" and "/work/data/x.xyz" are the same run). A checkpoint
    written before ``ema_decay`` or ``energy_uncertainty`` existed is one of a run
    with their defaults (off; auto)."""
    config = copy.deepcopy(config)
    training = config["architecture"]["training"]
    training.pop("num_epochs", None)
    if training.get("ema_decay") is None:
        training.pop("ema_decay", None)
    if training.get("energy_uncertainty", "auto") == "auto":
        training.pop("energy_uncertainty", None)
    for section, names in (
        (config.get("data", {}), ("train", "val", "test")),
        (training, ("model_checkpoint",)),
    ):
        for name in names:
            if isinstance(section.get(name), str):
                section[name] = os.path.abspath(section[name])
    return config


def resume(
    path: Path,
    config: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: WeightEMA | None,
    announce: bool,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The loop state and best weights after the checkpoint at ``path`` (loaded
    into ``model``, ``optimizer``, ``scheduler`` and ``ema``), or those of a
    fresh run."""
    if not path.exists():
        state = {
            "epoch": 0,
            "best_value": math.inf,
            "best_epoch": 0,
            "best_metrics": {},
            "elapsed_s": 0.0,
        }
        return state, copy.deepcopy(model.state_dict())
    checkpoint = read_checkpoint(path, config)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if ema is not None:
        if checkpoint.get("ema") is None:
            raise TrainingConfigError(
                f"{path} holds no weight averages (ema_decay); delete it to start "
                "the run afresh"
            )
        ema.load_state_dict(checkpoint["ema"])
    if announce:
        print(
            f"resuming {path.parent} after epoch {checkpoint['state']['epoch']}",
            flush=True,
        )
    return checkpoint["state"], checkpoint["best_model"]


def save_best(
    model: Potential | LLPR,
    best_state: Mapping[str, torch.Tensor],
    path: Path,
    config: Mapping[str, Any],
    state: Mapping[str, Any],
    test_metrics: dict[str, float],
) -> None:
    """``model.safetensors`` with the best weights, statistics and errors (eV
    units), and how long the run took (s)."""
    snapshot = copy.deepcopy(model).cpu()
    snapshot.load_state_dict(best_state)
    record = {
        "data": {
            k: str(config["data"][k])
            for k in ("train", "val", "test")
            if config["data"].get(k)
        },
        "best_epoch": state["best_epoch"],
        "epochs_run": state["epoch"],
        "training_time_s": round(state["elapsed_s"], 1),
        "val_metrics": state["best_metrics"],
        "test_metrics": test_metrics,
        "hyperparameters": config["architecture"]["training"],
        "seed": config["seed"],
    }
    if isinstance(snapshot, LLPR):  # the wrapped model keeps its own training record
        snapshot.config["llpr"]["training"] = record
    else:
        snapshot.config["training"] = record
    atomic_write(path, lambda temporary: save_model(snapshot, temporary))


def read_log(path: Path, last_epoch: int) -> list[dict[str, Any]]:
    """The log rows up to the checkpoint a run resumes from (later ones are redone)."""
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [row for row in rows if int(float(row["epoch"])) <= last_epoch]


def write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    """The whole per-epoch CSV; columns are the union over rows (validation
    columns appear only on validation epochs)."""
    fieldnames: list[str] = []
    for row in rows:
        fieldnames += [key for key in row if key not in fieldnames]

    def write(temporary: str) -> None:
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fieldnames, restval="")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)
