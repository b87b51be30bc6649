"""Errors of a model on labelled graphs, and parity plots.

Used by the trainer for validation and by ``pes-calc eval``. Errors accumulate
sums over the whole set (not averages of batch averages), so the numbers do not
depend on the batch size. Units: eV/atom, eV/Å, eV/Å³.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pes_calc import keys
from pes_calc.graph import AtomicGraph, atoms_per_structure
from pes_calc.train.data import batch_order, iterate_batches

# what is compared, in which units, by `evaluate`
QUANTITIES = {
    "energy_per_atom": "eV/atom",
    "forces": "eV/Å",
    "stress": "eV/Å³",
}


@dataclass
class Evaluation:
    """Per-quantity predictions and targets (labelled entries only) and the errors."""

    predicted: dict[str, list[np.ndarray]] = field(default_factory=dict)
    target: dict[str, list[np.ndarray]] = field(default_factory=dict)
    num_structures: int = 0
    loss_sum: float = 0.0
    num_batches: int = 0

    @property
    def mean_loss(self) -> float:
        """The training objective averaged over batches (NaN if not computed)."""
        return self.loss_sum / self.num_batches if self.num_batches else math.nan

    def add(self, name: str, predicted: torch.Tensor, target: torch.Tensor) -> None:
        mask = torch.isfinite(target)
        self.predicted.setdefault(name, []).append(predicted.detach()[mask].cpu().double().numpy())
        self.target.setdefault(name, []).append(target[mask].cpu().double().numpy())

    def arrays(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.predicted[name]), np.concatenate(self.target[name])

    def metrics(self) -> dict[str, float]:
        """``<quantity>_rmse`` and ``<quantity>_mae`` for each labelled quantity, plus
        ``rmse_prod`` and ``mae_prod`` (the products, metatrain's model selection)."""
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
        results["num_structures"] = self.num_structures
        return results


def evaluate(
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
    batch."""
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
        if compute_forces:
            evaluation.add("forces", predictions[keys.FORCES], batch.properties[keys.FORCES])
        if compute_stress:
            evaluation.add("stress", predictions[keys.STRESS], batch.properties[keys.STRESS])
    return evaluation


def parity_plot(evaluation: Evaluation, path: str, title: str = "") -> None:
    """Predicted against reference for each labelled quantity, one panel each,
    with the RMSE in the panel title; written to ``path`` (PNG, PDF, ...)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    names = [n for n in QUANTITIES if n in evaluation.predicted]
    metrics = evaluation.metrics()
    figure, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.2), squeeze=False)
    for axis, name in zip(axes[0], names):
        predicted, target = evaluation.arrays(name)
        axis.scatter(target, predicted, s=4, alpha=0.5, linewidths=0)
        low, high = float(np.min([target.min(), predicted.min()])), float(
            np.max([target.max(), predicted.max()])
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
    plt.close(figure)
