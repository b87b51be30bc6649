"""An ``architecture: {name: llpr}`` run: wrap a trained model in `LLPR`, fit
its covariance and calibration, and optionally train its ensemble.

Every LLPR-specific decision of the trainer is here (`LLPRSetup`): the model is
the fitted wrapper; the loss is an ensemble loss; only the ensemble displacements
train unless ``train_all_parameters``; a frozen backbone trains on linearised
graphs (cached features, the model never runs again); and after training with
all parameters the covariance and α are refitted on the moved features.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import ase
import torch
from torch import nn

from pes_calc import keys
from pes_calc.graph import AtomicGraph
from pes_calc.io import ModelFileError, load_model
from pes_calc.llpr import LLPR
from pes_calc.potential import Potential
from pes_calc.train.config import TrainingConfigError
from pes_calc.train.llpr import (
    calibrate,
    factorise,
    fit_covariance,
    recalibrate_forces,
    wrap,
)
from pes_calc.train.llpr_ensemble import LinearisedEnsemble, linearise
from pes_calc.train.losses import TotalLoss, ensemble_loss_from_config
from pes_calc.train.setup import ModelSetup, TrainingData

__all__ = ["LLPRSetup"]


class LLPRSetup(ModelSetup):
    """The `LLPR` wrapper of ``training.model_checkpoint``, fitted before the first
    epoch; ``num_epochs`` null (0 epochs) means fitting only."""

    def species_and_cutoff(
        self, structures: Sequence[ase.Atoms]
    ) -> tuple[list[str], float]:
        self.base = _model_to_wrap(self.training["model_checkpoint"])
        return self.base.species, self.base.cutoff

    def model(self, data: TrainingData, device: torch.device, verbose: bool) -> LLPR:
        # a wrapper keeps the statistics its model was trained with
        return _fit_llpr(
            self.base,
            self.section,
            self.config["seed"],
            data.train_graphs,
            data.val_graphs,
            device,
            verbose,
        )

    def loss(self, available: Sequence[str]) -> TotalLoss:
        return ensemble_loss_from_config(self.training["loss"], available)

    def set_trainable(self, model: nn.Module) -> None:
        """The ensemble displacements; the backbone too if train_all_parameters."""
        train_backbone = self.training["train_all_parameters"]
        for parameter in model.potential.parameters():
            parameter.requires_grad_(parameter.requires_grad and train_backbone)
        model.state.ensemble_displacements.requires_grad_(True)

    def loop_module(
        self,
        model: nn.Module,
        train_graphs: list[AtomicGraph],
        val_graphs: list[AtomicGraph],
        device: torch.device,
        verbose: bool,
    ) -> tuple[nn.Module, list[AtomicGraph], list[AtomicGraph]]:
        """A frozen backbone's ensemble, linearised on cached features and their
        Jacobians, so that an epoch costs no model evaluation."""
        if not self.training["num_epochs"] or self.training["train_all_parameters"]:
            return model, train_graphs, val_graphs
        with_stress = keys.STRESS in train_graphs[0].properties
        if verbose:
            print("caching last-layer features and their Jacobians", flush=True)
        train_graphs = linearise(model, train_graphs, with_stress, device)
        val_graphs = linearise(model, val_graphs, with_stress, device)
        return LinearisedEnsemble(model), train_graphs, val_graphs

    def finish(
        self, model: nn.Module, data: TrainingData, device: torch.device
    ) -> bool:
        """After ensemble training, refit the force factor β on the trained
        members and the energy σ from ``energy_uncertainty`` (auto: analytic or
        the members' spread, by the validation NLL); with all parameters trained
        the features moved too, so σ's covariance and α are refitted first."""
        model.state.ensemble_displacements.requires_grad_(False)
        if not self.training["num_epochs"]:
            return False
        if self.training["train_all_parameters"]:
            _refit_llpr_uncertainty(
                model, self.training, data.train_graphs, data.val_graphs, device
            )
        recalibrate_forces(
            model,
            data.val_graphs,
            self.training["calibration_method"],
            self.training["batch_size"],
            device,
            energies=self.training["energy_uncertainty"],
        )
        return True


def _model_to_wrap(path: str) -> Potential:
    """The trained model an llpr config wraps (an LLPR file: its inner model)."""
    try:
        model = load_model(path)
    except ModelFileError as error:
        raise TrainingConfigError(f"model_checkpoint: {error}") from error
    return model.potential if isinstance(model, LLPR) else model


def _fit_llpr(
    potential: Potential,
    section: Mapping[str, Any],
    seed: int,
    train_graphs: Sequence[AtomicGraph],
    val_graphs: Sequence[AtomicGraph],
    device: torch.device,
    verbose: bool,
) -> LLPR:
    """Covariance over the training set, Cholesky, α on the validation set and the
    sampled ensemble: one pass over each set."""
    training = section["training"]
    start = time.perf_counter()
    llpr = wrap(
        potential.to(device),
        section["model"]["num_ensemble_members"]["energy"],
        train_graphs,  # batches are cast to the model's dtype as they are made
        val_graphs,
        regularizer=training["regularizer"],
        calibration_method=training["calibration_method"],
        batch_size=training["batch_size"],
        device=device,
        seed=seed,
    )
    if verbose:
        settings = llpr.config["llpr"]
        print(
            f"LLPR: covariance of {llpr.num_features} features, regularizer "
            f"{settings['regularizer']:.1e}, calibration α "
            f"{settings['multiplier']:.4g} ({settings['calibration_method']}), "
            f"force factor β {settings.get('force_scale', 1.0):.4g}, "
            f"{llpr.num_ensemble_members} ensemble members, "
            f"{time.perf_counter() - start:.1f} s",
            flush=True,
        )
    return llpr


def _refit_llpr_uncertainty(
    model: LLPR,
    training: Mapping[str, Any],
    train_graphs: Sequence[AtomicGraph],
    val_graphs: Sequence[AtomicGraph],
    device: torch.device,
) -> None:
    """σ's covariance, factor and α fitted again on the model as trained."""
    fit_covariance(model, train_graphs, training["batch_size"], device)
    model.config["llpr"]["regularizer"] = factorise(model, training["regularizer"])
    model.config["llpr"]["multiplier"] = calibrate(
        model,
        val_graphs,
        training["calibration_method"],
        training["batch_size"],
        device,
    )
