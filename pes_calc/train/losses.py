"""Losses with graph-pes semantics: a `Loss` reads the model's predictions and the
labels in ``graph.properties``; `TotalLoss` is their weighted sum.

Labels that a structure lacks are NaN and are left out of every metric, so a batch
that mixes clusters (no stress) and bulk cells needs no special handling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from pes_calc import keys
from pes_calc.graph import AtomicGraph, atoms_per_structure


def _known(prediction: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """The entries whose target is finite, flattened."""
    mask = torch.isfinite(target)
    return prediction[mask], target[mask].to(prediction.dtype)


class Metric(nn.Module):
    """A reduction of prediction - target over the labelled entries."""

    def forward(self, prediction: Tensor, target: Tensor) -> Tensor:
        prediction, target = _known(prediction, target)
        if target.numel() == 0:  # nothing labelled in this batch: no signal, no NaN
            return prediction.sum() * 0.0
        return self.reduce(prediction - target)

    def reduce(self, errors: Tensor) -> Tensor:
        raise NotImplementedError


class MSE(Metric):
    """Mean squared error."""

    def reduce(self, errors: Tensor) -> Tensor:
        return errors.square().mean()


class RMSE(Metric):
    """Root-mean-square error."""

    def reduce(self, errors: Tensor) -> Tensor:
        return errors.square().mean().sqrt()


class MAE(Metric):
    """Mean absolute error."""

    def reduce(self, errors: Tensor) -> Tensor:
        return errors.abs().mean()


METRICS = {"MSE": MSE, "RMSE": RMSE, "MAE": MAE}


def metric_from(metric: str | Metric) -> Metric:
    """A metric from its name (case-insensitive) or itself."""
    if isinstance(metric, Metric):
        return metric
    try:
        return METRICS[str(metric).upper()]()
    except KeyError:
        raise ValueError(
            f"unknown metric {metric!r}; choose from {', '.join(METRICS)}"
        ) from None


class Loss(nn.Module):
    """One term of the training objective.

    ``forward(model, graph, predictions)`` returns an unweighted scalar; ``weight``
    says how much it counts in a `TotalLoss`; ``required_properties`` are the model
    outputs it needs (so the trainer skips forces/stress when nothing asks for them).
    """

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = float(weight)

    @property
    def name(self) -> str:
        raise NotImplementedError

    @property
    def required_properties(self) -> list[str]:
        raise NotImplementedError

    def pre_fit(self, training_data: Sequence[AtomicGraph]) -> None:
        """Called once with the training graphs before training starts."""

    def forward(
        self, model: nn.Module, graph: AtomicGraph, predictions: dict[str, Tensor]
    ) -> Tensor:
        raise NotImplementedError


class PropertyLoss(Loss):
    """``metric(predictions[property], graph.properties[property])``."""

    def __init__(
        self, property: str, metric: str | Metric = "RMSE", weight: float = 1.0
    ):
        super().__init__(weight)
        self.property = property
        self.metric = metric_from(metric)

    @property
    def name(self) -> str:
        return f"{self.property}_{type(self.metric).__name__.lower()}"

    @property
    def required_properties(self) -> list[str]:
        return [self.property]

    def forward(self, model, graph, predictions):
        return self.metric(predictions[self.property], graph.properties[self.property])


class PerAtomEnergyLoss(PropertyLoss):
    """The metric over energies divided by each structure's atom count (eV/atom),
    so large cells do not dominate the energy term."""

    def __init__(self, metric: str | Metric = "RMSE", weight: float = 1.0):
        super().__init__(keys.ENERGY, metric, weight)

    @property
    def name(self) -> str:
        return f"energy_per_atom_{type(self.metric).__name__.lower()}"

    def forward(self, model, graph, predictions):
        counts = atoms_per_structure(graph).to(predictions[keys.ENERGY].dtype)
        return self.metric(
            predictions[keys.ENERGY] / counts, graph.properties[keys.ENERGY] / counts
        )


class TotalLoss(nn.Module):
    """Σ weight · loss over several `Loss` terms."""

    def __init__(self, losses: Sequence[Loss]):
        super().__init__()
        if not losses:
            raise ValueError("TotalLoss needs at least one loss term")
        names = [loss.name for loss in losses]
        if len(set(names)) != len(names):
            raise ValueError(f"loss terms must differ, got {names}")
        self.losses = nn.ModuleList(losses)

    @property
    def required_properties(self) -> list[str]:
        return sorted({p for loss in self.losses for p in loss.required_properties})

    def pre_fit(self, training_data: Sequence[AtomicGraph]) -> None:
        for loss in self.losses:
            loss.pre_fit(training_data)

    def forward(
        self, model: nn.Module, graph: AtomicGraph, predictions: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted total and each term's unweighted value (keyed by name)."""
        terms = {loss.name: loss(model, graph, predictions) for loss in self.losses}
        total = sum(loss.weight * terms[loss.name] for loss in self.losses)
        return total, terms  # type: ignore[return-value]  # (module attributes)


class EnsembleNLLLoss(Loss):
    """Gaussian negative log-likelihood of the labels under an LLPR ensemble:
    mean 0.5 (log(2π s²) + r²/s²) with r the model's error and s² the ensemble
    variance around the model's prediction (the ensemble is centred on it).

    ``property`` is ``"energy"`` (per atom: energies and spreads divided by the
    atom count) or ``"forces"`` (per component), from ``energy_ensemble`` (S, M)
    and ``forces_ensemble`` (M, N, 3).
    """

    # s² floor (eV², eV²/Å²): a component with no spread must not give log(0)
    VARIANCE_FLOOR = 1e-12

    def __init__(self, property: str, weight: float = 1.0):
        super().__init__(weight)
        if property not in (keys.ENERGY, keys.FORCES):
            raise ValueError(f"ensemble_nll covers energy and forces, not {property!r}")
        self.property = property

    @property
    def name(self) -> str:
        return "energy_per_atom_nll" if self.property == keys.ENERGY else "forces_nll"

    @property
    def required_properties(self) -> list[str]:
        if self.property == keys.ENERGY:
            return [keys.ENERGY, keys.ENERGY_ENSEMBLE]
        return [keys.FORCES, keys.FORCES_ENSEMBLE]

    def forward(self, model, graph, predictions):
        if self.property == keys.ENERGY:
            counts = atoms_per_structure(graph).to(predictions[keys.ENERGY].dtype)
            mean = predictions[keys.ENERGY] / counts
            members = predictions[keys.ENERGY_ENSEMBLE] / counts.unsqueeze(-1)
            variance = (members - mean.unsqueeze(-1)).square().mean(dim=-1)
            target = graph.properties[keys.ENERGY] / counts
        else:
            mean = predictions[keys.FORCES]
            variance = (predictions[keys.FORCES_ENSEMBLE] - mean).square().mean(dim=0)
            target = graph.properties[keys.FORCES]
        known = torch.isfinite(target)
        if not bool(known.any()):
            return mean.sum() * 0.0
        variance = variance[known] + self.VARIANCE_FLOOR
        errors = mean[known] - target[known].to(mean.dtype)
        return 0.5 * torch.mean(
            torch.log(2 * torch.pi * variance) + errors.square() / variance
        )


def ensemble_loss_from_config(
    spec: str | Mapping | None, available: Sequence[str]
) -> TotalLoss:
    """The LLPR ensemble objective: ``"ensemble_nll"`` (energy per atom and, when
    labelled, forces, weight 1 each) or ``{type: ensemble_nll, energy: w, forces: w}``.
    Forces count by default: an energy-only objective leaves force spreads untuned."""
    spec = {"type": spec} if isinstance(spec, str) or spec is None else dict(spec)
    kind = spec.pop("type", "ensemble_nll") or "ensemble_nll"
    if kind not in ("ensemble_nll", "gaussian_nll_ensemble"):
        raise ValueError(f"unknown LLPR loss {kind!r}; use ensemble_nll")
    unknown = set(spec) - {"energy", "forces"}
    if unknown:
        raise ValueError(
            f"ensemble_nll: unknown keys {sorted(unknown)}; known: type, energy, forces"
        )
    if not spec:
        spec = {name: 1.0 for name in ("energy", "forces") if name in available}
    losses = []
    for term, weight in spec.items():
        if term not in available:
            raise ValueError(
                f"loss.{term} needs {term} labels, which the training data lacks"
            )
        if float(weight) != 0.0:
            losses.append(EnsembleNLLLoss(term, float(weight)))
    return TotalLoss(losses)


# config names of the common terms; "energy" means per-atom energy (eV/atom)
_TERMS = {
    "energy": lambda metric, weight: PerAtomEnergyLoss(metric, weight),
    "total_energy": lambda metric, weight: PropertyLoss(keys.ENERGY, metric, weight),
    "forces": lambda metric, weight: PropertyLoss(keys.FORCES, metric, weight),
    "stress": lambda metric, weight: PropertyLoss(keys.STRESS, metric, weight),
}


def loss_from_config(spec: Mapping | None, available: Sequence[str]) -> TotalLoss:
    """A `TotalLoss` from the config's ``loss`` section.

    ``{metric: MSE, energy: 1.0, forces: 10.0, stress: 1.0}``: a number is a weight,
    a mapping ``{weight, metric}`` sets both. Left out (None), every label present
    in the data gets weight 1 with MSE, the per-atom energy standing for energy.
    ``available`` lists the label names the training data has.
    """
    spec = dict(spec or {})
    default_metric = spec.pop("metric", "MSE")
    if not spec:
        spec = {
            name: 1.0 for name in ("energy", "forces", "stress") if name in available
        }
    losses = []
    for term, setting in spec.items():
        if term not in _TERMS:
            raise ValueError(
                f"unknown loss term {term!r}; known: metric, {', '.join(_TERMS)}"
            )
        if isinstance(setting, (int, float)):
            setting = {"weight": setting}
        setting = dict(setting)
        unknown = set(setting) - {"weight", "metric"}
        if unknown:
            raise ValueError(
                f"loss.{term}: unknown keys {sorted(unknown)}; known: weight, metric"
            )
        label = keys.ENERGY if term in ("energy", "total_energy") else term
        if label not in available:
            raise ValueError(
                f"loss.{term} needs {label} labels, which the training data lacks"
            )
        if float(setting.get("weight", 1.0)) == 0.0:
            continue
        metric = setting.get("metric", default_metric)
        losses.append(_TERMS[term](metric, setting.get("weight", 1.0)))
    return TotalLoss(losses)
