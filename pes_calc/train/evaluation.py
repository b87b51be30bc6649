"""Errors of a model on labelled graphs, parity plots, and the calibration of
predicted uncertainties (LLPR models).

Used by the trainer for validation and by ``pes-calc eval``. Errors accumulate
sums over the whole set (not averages of batch averages), so the numbers do not
depend on the batch size. Units: eV/atom, eV/Å, eV/Å³.

A model whose outputs hold ``energy_uncertainty`` (and ``forces_uncertainty``) is
also scored on its standard deviations σ against the residuals r = predicted -
reference of the structure energy (what LLPR calibrates) and of each force
component:

| metric | formula | ideal |
|---|---|---|
| ``<q>_nll`` | mean ½ (log(2π σ²) + r²/σ²) | low; over σ → cσ, least at mean z² = 1 |
| ``<q>_mean_squared_z`` | mean z², z = r/σ | 1 (> 1 overconfident) |
| ``<q>_spearman`` | rank correlation of σ and abs(r) | near 1 (σ ranks errors) |
| ``<q>_uncertainty_mean`` | mean σ | |

q is ``energy`` (eV), ``forces`` (eV/Å, per component) or ``atom_forces`` (eV/Å,
per atom: ‖ΔF_i‖/√3 against ‖σ_F,i‖/√3). The NLL is in nats for errors in eV
(eV/Å): the log-density of a residual, so it shifts by log(1000) ≈ 6.91 if the
same errors were measured in meV.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from torch import nn

from pes_calc import keys
from pes_calc.choices import as_dtype
from pes_calc.graph import (
    AtomicGraph,
    atoms_per_structure,
    batch_order,
    iterate_batches,
)

# what is compared, in which units, by `measure_errors`
QUANTITIES = {
    "energy_per_atom": "eV/atom",
    "forces": "eV/Å",
    "stress": "eV/Å³",
}
# what predicted σ are scored against: the total energy, since that is the
# quantity LLPR's σ_E and its calibration describe, and each force component
CALIBRATED = {
    "energy": "eV",
    "forces": "eV/Å",
    # per atom: error and σ as their norms over the components / √3
    "atom_forces": "eV/Å",
}
CALIBRATION_BINS = 12


@dataclass
class Evaluation:
    """Per-quantity predictions and targets (labelled entries only) and the errors."""

    predicted: dict[str, list[np.ndarray]] = field(default_factory=dict)
    target: dict[str, list[np.ndarray]] = field(default_factory=dict)
    num_structures: int = 0
    loss_sum: float = 0.0
    num_batches: int = 0
    # residuals and predicted σ of `CALIBRATED` quantities (uncertainty models only)
    residuals: dict[str, list[np.ndarray]] = field(default_factory=dict)
    uncertainties: dict[str, list[np.ndarray]] = field(default_factory=dict)

    @property
    def mean_loss(self) -> float:
        """The training objective averaged over batches (NaN if not computed)."""
        return self.loss_sum / self.num_batches if self.num_batches else math.nan

    def add(self, name: str, predicted: torch.Tensor, target: torch.Tensor) -> None:
        mask = torch.isfinite(target)
        predicted = predicted.detach()[mask]
        self.predicted.setdefault(name, []).append(predicted.cpu().double().numpy())
        self.target.setdefault(name, []).append(target[mask].cpu().double().numpy())

    def arrays(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.predicted[name]), np.concatenate(self.target[name])

    def add_uncertainty(
        self,
        name: str,
        predicted: torch.Tensor,
        target: torch.Tensor,
        uncertainty: torch.Tensor,
    ) -> None:
        """Residuals and σ (same shape as ``target``) of the labelled entries whose
        σ is positive: a zero σ (a force fixed by symmetry) has no z-score."""
        sigma = uncertainty.detach()
        mask = torch.isfinite(target) & torch.isfinite(sigma) & (sigma > 0)
        residual = predicted.detach()[mask].double() - target[mask].double()
        self.residuals.setdefault(name, []).append(residual.cpu().numpy())
        sigma = sigma[mask].double()
        self.uncertainties.setdefault(name, []).append(sigma.cpu().numpy())

    def calibration_arrays(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(residuals, σ) of ``name`` in `CALIBRATED` units."""
        residuals, sigmas = self.residuals[name], self.uncertainties[name]
        return np.concatenate(residuals), np.concatenate(sigmas)

    def metrics(self) -> dict[str, float]:
        """``<quantity>_rmse`` and ``<quantity>_mae`` for each labelled quantity, plus
        ``rmse_prod`` and ``mae_prod`` (the products, metatrain's model selection).

        Models with uncertainties add `calibration_metrics` for ``energy`` (the
        structure energy, eV) and ``forces`` (eV/Å) as ``energy_nll`` etc.
        """
        results: dict[str, float] = {}
        for name in QUANTITIES:
            if name not in self.predicted:
                continue
            predicted, target = self.arrays(name)
            if target.size == 0:
                continue
            errors = predicted - target
            results[f"{name}_rmse"] = float(np.sqrt(np.mean(errors**2)))
            results[f"{name}_mae"] = float(np.mean(np.abs(errors)))
        for kind in ("rmse", "mae"):
            values = [v for k, v in results.items() if k.endswith(f"_{kind}")]
            if values:
                results[f"{kind}_prod"] = float(math.prod(values))
        for name in CALIBRATED:
            if name not in self.residuals:
                continue
            residuals, sigmas = self.calibration_arrays(name)
            if residuals.size == 0:
                continue
            for metric, value in calibration_metrics(residuals, sigmas).items():
                results[f"{name}_{metric}"] = value
        results["num_structures"] = self.num_structures
        return results


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``; tied values share the mean of their ranks."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # rank of the last member of each group of equal values
    return (last - 0.5 * (counts - 1))[inverse.reshape(-1)].astype(np.float64)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's of the average ranks (ties
    included); NaN when either has fewer than two distinct values."""
    rank_x, rank_y = average_ranks(np.ravel(x)), average_ranks(np.ravel(y))
    rank_x, rank_y = rank_x - rank_x.mean(), rank_y - rank_y.mean()
    norm = math.sqrt(float(np.sum(rank_x**2) * np.sum(rank_y**2)))
    return float(np.sum(rank_x * rank_y) / norm) if norm > 0 else math.nan


def calibration_metrics(residuals: np.ndarray, sigmas: np.ndarray) -> dict[str, float]:
    """How well σ describes residuals r, both in one unit (eV or eV/Å).

    ``nll``: mean Gaussian negative log-likelihood ½ (log(2π σ²) + r²/σ²), in nats
    for that unit; ``mean_squared_z``: mean r²/σ², 1 when the σ are calibrated,
    above 1 when overconfident; ``spearman``: rank correlation of σ with |r|,
    whether larger σ flag larger errors; ``uncertainty_mean``: mean σ.
    """
    residuals = np.asarray(residuals, dtype=np.float64)
    sigmas = np.asarray(sigmas, dtype=np.float64)
    squared_z = (residuals / sigmas) ** 2
    return {
        "nll": float(np.mean(0.5 * (np.log(2 * math.pi * sigmas**2) + squared_z))),
        "mean_squared_z": float(np.mean(squared_z)),
        "spearman": spearman(sigmas, np.abs(residuals)),
        "uncertainty_mean": float(np.mean(sigmas)),
    }


def calibration_bins(
    residuals: np.ndarray, sigmas: np.ndarray, num_bins: int = CALIBRATION_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(RMS σ, RMS residual, count) in ``num_bins`` bins of ascending σ holding
    equal numbers of samples (quantile bins; fewer when there are fewer samples).

    RMS σ, not mean σ, is the x value: calibrated Gaussian errors have
    E[r²] = σ², so RMS r = RMS σ in every bin, while mean σ ≤ RMS σ would bend the
    curve of a perfect model off the diagonal in wide bins.
    """
    order = np.argsort(sigmas, kind="stable")
    groups = [g for g in np.array_split(order, min(num_bins, len(order))) if g.size]
    rms_sigma = np.array([math.sqrt(float(np.mean(sigmas[g] ** 2))) for g in groups])
    rms_error = np.array([math.sqrt(float(np.mean(residuals[g] ** 2))) for g in groups])
    return rms_sigma, rms_error, np.array([g.size for g in groups])


def measure_errors(
    model: nn.Module,
    graphs: Sequence[AtomicGraph],
    *,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    loss_fn: Callable | None = None,
) -> Evaluation:
    """Run ``model`` (eager or TorchScript) over labelled ``graphs`` and collect
    predictions against labels; ``loss_fn`` (a `TotalLoss`) is also evaluated per
    batch. Predicted ``energy_uncertainty`` and ``forces_uncertainty`` (an `LLPR`
    with ``ensemble_forces`` on) are collected with their residuals."""
    dtype = as_dtype(dtype)
    if dtype is None:
        dtype = next(iter(model.parameters())).dtype
    labels = set(graphs[0].properties) if graphs else set()
    compute_forces = keys.FORCES in labels
    compute_stress = keys.STRESS in labels
    evaluation = Evaluation()
    order = batch_order(len(graphs), batch_size, shuffle=False)
    for batch in iterate_batches(graphs, order, device, dtype):
        with torch.enable_grad():  # forces are derivatives, even when evaluating
            predictions = model(batch, compute_forces, compute_stress)
        counts = atoms_per_structure(batch).to(dtype)
        evaluation.num_structures += int(counts.numel())
        if loss_fn is not None:
            with torch.no_grad():
                evaluation.loss_sum += float(loss_fn(model, batch, predictions)[0])
            evaluation.num_batches += 1
        if keys.ENERGY in labels:
            evaluation.add(
                "energy_per_atom",
                predictions[keys.ENERGY] / counts,
                batch.properties[keys.ENERGY] / counts,
            )
        targets = batch.properties
        if compute_forces:
            evaluation.add("forces", predictions[keys.FORCES], targets[keys.FORCES])
        if compute_stress:
            evaluation.add("stress", predictions[keys.STRESS], targets[keys.STRESS])
        if keys.ENERGY in labels and keys.ENERGY_UNCERTAINTY in predictions:
            evaluation.add_uncertainty(
                "energy",
                predictions[keys.ENERGY],
                targets[keys.ENERGY],
                predictions[keys.ENERGY_UNCERTAINTY],
            )
        if compute_forces and keys.FORCES_UNCERTAINTY in predictions:
            evaluation.add_uncertainty(
                "forces",
                predictions[keys.FORCES],
                targets[keys.FORCES],
                predictions[keys.FORCES_UNCERTAINTY],
            )
            _add_atom_forces(evaluation, predictions, targets[keys.FORCES])
    return evaluation


def _add_atom_forces(
    evaluation: Evaluation, predictions: dict[str, torch.Tensor], target: torch.Tensor
) -> None:
    """Each labelled atom's force error ‖ΔF_i‖/√3 against its σ ‖σ_F,i‖/√3 (eV/Å):
    whether σ ranks and sizes the error of an atom, not of a component."""
    error = predictions[keys.FORCES].detach() - target
    labelled = torch.isfinite(target).all(dim=-1)
    norm = torch.linalg.vector_norm(torch.nan_to_num(error), dim=-1) / math.sqrt(3)
    sigma = torch.linalg.vector_norm(
        predictions[keys.FORCES_UNCERTAINTY].detach(), dim=-1
    ) / math.sqrt(3)
    unlabelled = torch.full_like(norm, math.nan)
    evaluation.add_uncertainty(
        "atom_forces", norm, torch.where(labelled, 0.0, unlabelled), sigma
    )


def evaluate(
    model: nn.Module, graphs: Sequence[AtomicGraph], **options: Any
) -> Evaluation:
    """Deprecated name of `measure_errors` (``pes_calc.evaluate`` is the batched
    prediction of structures, without labels)."""
    warnings.warn(
        "pes_calc.train.evaluate is renamed pes_calc.train.measure_errors",
        DeprecationWarning,
        stacklevel=2,
    )
    return measure_errors(model, graphs, **options)


def parity_plot(evaluation: Evaluation, path: str, title: str = "") -> None:
    """Predicted against reference for each labelled quantity, one panel each,
    with the RMSE in the panel title; written to ``path`` (PNG, PDF, ...)."""
    names = [n for n in QUANTITIES if n in evaluation.predicted]
    metrics = evaluation.metrics()
    # a Figure without pyplot: no global backend or figure registry is touched
    figure = Figure(figsize=(4.2 * len(names), 4.2))
    axes = figure.subplots(1, len(names), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        predicted, target = evaluation.arrays(name)
        axis.scatter(target, predicted, s=4, alpha=0.5, linewidths=0)
        low, high = (
            float(np.min([target.min(), predicted.min()])),
            float(np.max([target.max(), predicted.max()])),
        )
        axis.plot([low, high], [low, high], color="black", linewidth=0.8)
        axis.set_xlabel(f"reference {name} ({QUANTITIES[name]})")
        axis.set_ylabel(f"predicted {name} ({QUANTITIES[name]})")
        axis.set_title(f"{name}: RMSE {metrics[f'{name}_rmse']:.3g} {QUANTITIES[name]}")
        axis.set_aspect("equal", adjustable="datalim")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def calibration_plot(evaluation: Evaluation, path: str, title: str = "") -> None:
    """One row per `CALIBRATED` quantity with uncertainties: RMS error against RMS
    predicted σ in quantile bins of σ (log-log, y = x is calibrated), and the
    histogram of z = r/σ against the standard normal; written to ``path``."""
    names = [n for n in CALIBRATED if n in evaluation.residuals]
    names = [n for n in names if evaluation.calibration_arrays(n)[0].size]
    if not names:
        raise ValueError("the evaluation holds no predicted uncertainties to plot")
    metrics = evaluation.metrics()
    figure = Figure(figsize=(8.4, 4.2 * len(names)))
    axes = figure.subplots(len(names), 2, squeeze=False)
    for (binned, histogram), name in zip(axes, names, strict=True):
        residuals, sigmas = evaluation.calibration_arrays(name)
        unit = CALIBRATED[name]
        rms_sigma, rms_error, _ = calibration_bins(residuals, sigmas)
        low = float(min(rms_sigma.min(), rms_error[rms_error > 0].min(initial=np.inf)))
        high = float(max(rms_sigma.max(), rms_error.max()))
        binned.plot(
            [low, high], [low, high], color="black", linewidth=0.8, label="y = x"
        )
        binned.plot(
            rms_sigma, rms_error, "o-", markersize=4, label=f"{len(rms_sigma)} bins"
        )
        binned.set_xscale("log")
        binned.set_yscale("log")
        # same decades on both axes, so that the diagonal is at 45°
        binned.set_xlim(low / 1.25, high * 1.25)
        binned.set_ylim(low / 1.25, high * 1.25)
        binned.set_aspect("equal", adjustable="box")
        for axis in (binned.xaxis, binned.yaxis):  # all minor labels would collide
            axis.set_major_formatter(FuncFormatter(_log_tick))
            axis.set_minor_formatter(FuncFormatter(_log_tick))
        binned.set_xlabel(f"RMS predicted σ ({unit})")
        binned.set_ylabel(f"RMS error ({unit})")
        binned.set_title(
            f"{name}: ⟨z²⟩ {metrics[f'{name}_mean_squared_z']:.3g}, "
            f"Spearman {metrics[f'{name}_spearman']:.2f}"
        )
        binned.legend(loc="upper left")
        z = residuals / sigmas
        limit = 5.0
        outside = float(np.mean(np.abs(z) > limit))
        bins = int(np.clip(math.sqrt(z.size), 10, 50))  # few structures, few bins
        histogram.hist(
            z,
            bins=bins,
            range=(-limit, limit),
            density=True,
            alpha=0.6,
            label=f"{name} ({100 * outside:.1f}% beyond ±{limit:g})",
        )
        grid = np.linspace(-limit, limit, 201)
        histogram.plot(
            grid,
            np.exp(-0.5 * grid**2) / math.sqrt(2 * math.pi),
            color="black",
            linewidth=0.8,
            label="N(0, 1)",
        )
        histogram.set_xlabel("z = (predicted - reference) / σ")
        histogram.set_ylabel("density")
        histogram.set_title(f"{name}: NLL {metrics[f'{name}_nll']:.3f} (nats, {unit})")
        histogram.legend(loc="upper left", fontsize="small")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _log_tick(value: float, _position: int) -> str:
    """Label 1, 2 and 5 times powers of ten on a log axis, plainly (0.05)."""
    leading = round(value / 10.0 ** math.floor(math.log10(value))) if value > 0 else 0
    return f"{value:.3g}" if leading in (1, 2, 5) else ""
