"""Before the first epoch: the training data at the model's cutoff, and the
model and loss of each kind of run.

A `ModelSetup` says how one kind of run (a fresh model, a fine-tuned one, or an
LLPR wrapper: `pes_calc.train.llpr_training`) makes its model and loss; the epoch
loop (`pes_calc.train.loop`) is the same for all. A fresh model starts with
metatrain's composition model and scaling as its per-type energy shifts and
scales. Units: eV, eV/Å.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ase
import torch
from ase.data import chemical_symbols
from torch import nn

from pes_calc import keys
from pes_calc.build import build_model, cutoff_of
from pes_calc.graph import AtomicGraph
from pes_calc.io import load_model
from pes_calc.llpr import LLPR
from pes_calc.potential import Potential
from pes_calc.train.config import TrainingConfigError
from pes_calc.train.data import (
    LabelKeys,
    extract_labels,
    labelled_graphs,
    load_graphs,
    read_structures,
    species_in,
)
from pes_calc.train.losses import TotalLoss, loss_from_config
from pes_calc.train.stats import (
    composition_energies,
    resolve_stats,
    training_data_stats,
)

__all__ = [
    "FineTuneSetup",
    "FreshSetup",
    "ModelSetup",
    "TrainingData",
    "per_type_values",
    "read_training_data",
]


@dataclass
class TrainingData:
    """The labelled graphs a run trains and validates on, at the cutoff of its
    model, with the training set's statistics. The graphs stay on the CPU: read
    in float64, then cast to the model's dtype once the model exists."""

    label_keys: LabelKeys
    species: list[str]
    cutoff: float
    train_graphs: list[AtomicGraph]
    val_graphs: list[AtomicGraph]
    stats: dict[str, Any]


class ModelSetup:
    """How one kind of run makes its model and loss (a fresh model: `FreshSetup`).

    The trainer calls, in order: `species_and_cutoff`, `model`, `loss`,
    `set_trainable`, `loop_module` (after resuming) and `finish` (with the best
    weights loaded). A setup that starts from a trained model loads it in
    `species_and_cutoff`, after the training set has been read.
    """

    def __init__(self, config: Mapping[str, Any]):
        self.config = config
        self.section = config["architecture"]
        self.name: str = self.section["name"]
        self.training: dict[str, Any] = self.section["training"]

    def species_and_cutoff(
        self, structures: Sequence[ase.Atoms]
    ) -> tuple[list[str], float]:
        """The species and cutoff (Å) of the model to come, for ``structures``
        (the training set)."""
        raise NotImplementedError

    def model(
        self, data: TrainingData, device: torch.device, verbose: bool
    ) -> Potential | LLPR:
        """The model to train, with its training statistics in its config."""
        raise NotImplementedError

    def loss(self, available: Sequence[str]) -> TotalLoss:
        """The training loss, from the labels ``available`` in the data."""
        return loss_from_config(self.training["loss"], available)

    def set_trainable(self, model: nn.Module) -> None:
        """Choose which parameters train (all of them, unless overridden)."""

    def loop_module(
        self,
        model: nn.Module,
        train_graphs: list[AtomicGraph],
        val_graphs: list[AtomicGraph],
        device: torch.device,
        verbose: bool,
    ) -> tuple[nn.Module, list[AtomicGraph], list[AtomicGraph]]:
        """What the epoch loop runs, and on which graphs: here the model itself."""
        return model, train_graphs, val_graphs

    def finish(
        self, model: nn.Module, data: TrainingData, device: torch.device
    ) -> bool:
        """After training, with the best weights loaded; True if it changed them."""
        return False


class FreshSetup(ModelSetup):
    """A model built from the config's hyperparameters, with shifts and scales
    from the training data."""

    def species_and_cutoff(
        self, structures: Sequence[ase.Atoms]
    ) -> tuple[list[str], float]:
        species = list(self.section.get("species") or species_in(structures))
        return species, cutoff_of(self.name, self.section["model"])

    def model(
        self, data: TrainingData, device: torch.device, verbose: bool
    ) -> Potential | LLPR:
        hypers = resolve_stats(self.section["model"], data.stats, "architecture.model.")
        hypers.setdefault("seed", self.config["seed"])
        model = build_model(self.name, data.species, **hypers)
        _set_shifts_and_scales(
            model,
            self.section["model"],
            self.training,
            self.config["data"],
            data.train_graphs,
            data.stats,
        )
        model.config["training_data_stats"] = data.stats
        return model


class FineTuneSetup(ModelSetup):
    """A trained model (``finetune: {read_from: PATH}``) trained further, with the
    shifts and scales it has."""

    def species_and_cutoff(
        self, structures: Sequence[ase.Atoms]
    ) -> tuple[list[str], float]:
        self.base = _model_to_finetune(self.training["finetune"], self.name)
        return self.base.species, self.base.cutoff

    def model(
        self, data: TrainingData, device: torch.device, verbose: bool
    ) -> Potential | LLPR:
        self.base.config["training_data_stats"] = data.stats
        return self.base


def read_training_data(config: Mapping[str, Any], setup: ModelSetup) -> TrainingData:
    """The training and validation sets of ``config`` as graphs at the cutoff of
    the model ``setup`` makes, and the training set's statistics."""
    data = config["data"]
    label_keys = LabelKeys.from_config(data)
    structures = read_structures(data["train"])
    labels = extract_labels(structures, label_keys, name=str(data["train"]))
    species, cutoff = setup.species_and_cutoff(structures)
    train_graphs = labelled_graphs(
        structures, labels, species, cutoff, name=str(data["train"])
    )
    val_graphs = load_graphs(data["val"], species, cutoff, label_keys)
    stats = training_data_stats(train_graphs, species)
    return TrainingData(
        label_keys, list(species), cutoff, train_graphs, val_graphs, stats
    )


def _model_to_finetune(spec: Any, name: str) -> Potential:
    """The model named by ``finetune: {read_from: PATH}`` (or a bare path)."""
    path = spec.get("read_from") if isinstance(spec, Mapping) else spec
    if not path:
        raise TrainingConfigError(
            "finetune needs read_from: the model file to start from"
        )
    model = load_model(path)
    if isinstance(model, LLPR):
        raise TrainingConfigError(
            f"finetune: {path} is an LLPR model; fine-tune the model it wraps"
        )
    if model.config["name"] != name:
        raise TrainingConfigError(
            f"finetune: {path} is a {model.config['name']} model, but the config "
            f"trains {name}"
        )
    return model


def _set_shifts_and_scales(
    model: Potential,
    given_hypers: Mapping[str, Any],
    training: Mapping[str, Any],
    data: Mapping[str, Any],
    graphs: Sequence[AtomicGraph],
    stats: Mapping[str, Any],
) -> None:
    """metatrain's composition model and scaling, as the potential's per-type
    shifts (eV) and scales (eV). Values given in the model hyperparameters win."""
    species = model.species
    fixed_by_symbol = {
        **(data.get("isolated_atom_energies") or {}),
        **per_type_values(
            training["fixed_composition_weights"], "fixed_composition_weights"
        ),
    }
    unknown = set(fixed_by_symbol) - set(species)
    if unknown:
        raise TrainingConfigError(
            f"fixed composition weights for {sorted(unknown)}, which the model "
            f"({', '.join(species)}) does not have"
        )
    fixed = {species.index(s): float(e) for s, e in fixed_by_symbol.items()}
    shifts = None
    has_energies = keys.ENERGY in graphs[0].properties
    if "per_type_energy_shifts" not in given_hypers and has_energies:
        if training["remove_composition_contribution"]:
            shifts = composition_energies(graphs, len(species), fixed)
        elif fixed:
            shifts = [fixed.get(t, 0.0) for t in range(len(species))]
    if shifts is not None:
        model.per_type_energy_shifts.data.copy_(torch.tensor(shifts))
        model.config["model"]["per_type_energy_shifts"] = shifts
    fixed_scales = per_type_values(
        training["fixed_scaling_weights"], "fixed_scaling_weights", species
    )
    if fixed_scales and "per_type_energy_scales" not in given_hypers:
        unknown = set(fixed_scales) - set(species)
        if unknown:
            raise TrainingConfigError(
                f"fixed scaling weights for {sorted(unknown)}, which the model "
                f"({', '.join(species)}) does not have"
            )
        scales = model.per_type_energy_scales.detach().clone()
        if training["scale_targets"] and stats.get("forces_rms"):
            scales.fill_(float(stats["forces_rms"]))
        for symbol, value in fixed_scales.items():
            scales[species.index(symbol)] = float(value)
        model.per_type_energy_scales.data.copy_(scales)
        model.config["model"]["per_type_energy_scales"] = scales.tolist()
    elif training["scale_targets"] and "per_type_energy_scales" not in given_hypers:
        # forces set the natural energy scale; energy-only data uses the spread of
        # per-atom energies left after the composition fit
        scale = stats.get("forces_rms")
        if scale is None and shifts is not None:
            scale = _residual_per_atom_std(graphs, shifts)
        if scale:
            model.per_type_energy_scales.data.fill_(float(scale))
            model.config["model"]["per_type_energy_scales"] = float(scale)


def per_type_values(
    table: Mapping[Any, Any] | None, name: str, species: Sequence[str] | None = None
) -> dict[str, float]:
    """{symbol: value} from ``{Cu: v}``, metatrain's ``{energy: {Cu: v}}`` or
    ``{energy: {29: v}}`` (atomic numbers, as metatrain writes them); a single
    ``{energy: v}`` applies to every type in ``species``."""
    if not table:
        return {}
    if not isinstance(table, Mapping):
        raise TrainingConfigError(f"{name} must be a mapping, got {table!r}")
    if "energy" in table:
        if set(table) != {"energy"}:
            others = sorted(str(k) for k in table if k != "energy")
            raise TrainingConfigError(
                f"{name}: only the energy target exists here, not {others}"
            )
        table = table["energy"]
        if isinstance(table, (int, float)) and species is not None:
            return {symbol: float(table) for symbol in species}
    if not isinstance(table, Mapping):
        raise TrainingConfigError(f"{name} must map types to numbers, got {table!r}")
    values: dict[str, float] = {}
    for key, value in table.items():
        symbol = key
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            number = int(key)
            if not 0 < number < len(chemical_symbols):
                raise TrainingConfigError(f"{name}: {key} is not an atomic number")
            symbol = chemical_symbols[number]
        try:
            values[str(symbol)] = float(value)
        except (TypeError, ValueError):
            raise TrainingConfigError(
                f"{name}: {key}: {value!r} is not a number"
            ) from None
    return values


def _residual_per_atom_std(
    graphs: Sequence[AtomicGraph], shifts: list[float]
) -> float | None:
    """The spread (eV/atom) of per-atom energies left after the composition fit;
    None with fewer than two labelled structures."""
    residuals = []
    table = torch.tensor(shifts, dtype=torch.float64)
    for graph in graphs:
        energy = graph.properties[keys.ENERGY].double()
        if torch.isfinite(energy).all():
            composition = table[graph.species].sum()
            per_atom = (energy.sum() - composition) / graph.species.numel()
            residuals.append(per_atom.item())
    return float(torch.tensor(residuals).std()) if len(residuals) > 1 else None
