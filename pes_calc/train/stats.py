"""Training-data statistics, the composition fit, and ``${training_data_stats:NAME}``.

Every statistic is computed once over the training graphs (labels in
``graph.properties``, NaN where missing) and can be referenced from a config.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pes_calc import keys
from pes_calc.graph import (
    AtomicGraph,
    atoms_per_structure,
    number_of_atoms,
    number_of_edges,
)

STAT_NAMES = (
    "num_neighbors_mean",
    "per_atom_energy_mean",
    "per_atom_energy_std",
    "total_energy_std",
    "forces_rms",
    "per_type_forces_rms",
)
_REFERENCE = re.compile(r"^\$\{training_data_stats:([A-Za-z_]+)\}$")


def _finite(values: list[torch.Tensor]) -> torch.Tensor:
    """All finite entries of several tensors, flattened, in float64."""
    if not values:
        return torch.zeros(0)
    flat = torch.cat([v.detach().double().reshape(-1) for v in values])
    return flat[torch.isfinite(flat)]


def training_data_stats(
    graphs: Sequence[AtomicGraph], species: Sequence[str]
) -> dict[str, Any]:
    """The named statistics of a training set (eV, eV/Å; means over structures for
    energies, over force components for forces). A statistic whose labels are
    absent (no forces, say) is left out rather than set to a made-up value."""
    if not graphs:
        raise ValueError("training_data_stats needs at least one graph")
    num_atoms = sum(number_of_atoms(g) for g in graphs)
    num_edges = sum(number_of_edges(g) for g in graphs)
    stats: dict[str, Any] = {"num_neighbors_mean": num_edges / max(num_atoms, 1)}
    if all(keys.ENERGY in g.properties for g in graphs):
        energies = torch.cat([g.properties[keys.ENERGY].double() for g in graphs])
        counts = torch.cat([atoms_per_structure(g).double() for g in graphs])
        known = torch.isfinite(energies)
        if known.sum() > 0:
            per_atom = energies[known] / counts[known]
            stats["per_atom_energy_mean"] = per_atom.mean().item()
            stats["per_atom_energy_std"] = per_atom.std(unbiased=False).item()
            stats["total_energy_std"] = energies[known].std(unbiased=False).item()
    if all(keys.FORCES in g.properties for g in graphs):
        forces = _finite([g.properties[keys.FORCES] for g in graphs])
        if forces.numel() > 0:
            stats["forces_rms"] = forces.square().mean().sqrt().item()
            per_type = []
            for type_index in range(len(species)):
                typed = _finite(
                    [g.properties[keys.FORCES][g.species == type_index] for g in graphs]
                )
                # a species with no labelled forces falls back on the overall value
                per_type.append(
                    typed.square().mean().sqrt().item()
                    if typed.numel()
                    else stats["forces_rms"]
                )
            stats["per_type_forces_rms"] = per_type
    return stats


def composition_energies(
    graphs: Sequence[AtomicGraph],
    num_species: int,
    fixed: Mapping[int, float] | None = None,
) -> list[float]:
    """Per-type energies μ_t (eV) minimising Σ_s (E_s - Σ_t n_st μ_t)², with the
    types in ``fixed`` held at their given values (isolated-atom energies, say).
    A type that never occurs gets 0 unless fixed."""
    fixed = dict(fixed or {})
    rows, targets = [], []
    for graph in graphs:
        if keys.ENERGY not in graph.properties:
            continue
        energies = graph.properties[keys.ENERGY].double()
        for structure in range(energies.shape[0]):
            if not torch.isfinite(energies[structure]):
                continue
            mask = graph.structure_index == structure
            type_counts = torch.bincount(graph.species[mask], minlength=num_species)
            rows.append(type_counts.double())
            targets.append(energies[structure])
    if not rows:
        raise ValueError("the composition fit needs structures with energies")
    counts = torch.stack(rows)  # (S, T)
    target = torch.stack(targets)
    weights = torch.zeros(num_species, dtype=torch.float64)
    for type_index, value in fixed.items():
        weights[type_index] = float(value)
    target = target - counts @ weights
    free = [t for t in range(num_species) if t not in fixed and counts[:, t].sum() > 0]
    if free:
        solution = torch.linalg.lstsq(counts[:, free], target[:, None]).solution[:, 0]
        weights[free] = solution
    return weights.tolist()


def resolve_stats(value: Any, stats: Mapping[str, Any], where: str = "") -> Any:
    """``value`` with every ``"${training_data_stats:NAME}"`` string replaced by the
    statistic; an unknown or unavailable name is an error naming what is known."""
    if isinstance(value, Mapping):
        return {k: resolve_stats(v, stats, f"{where}{k}.") for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_stats(v, stats, where) for v in value]
    if isinstance(value, str) and value.startswith("${"):
        match = _REFERENCE.match(value.strip())
        if match is None:
            raise ValueError(
                f"{where.rstrip('.')}: cannot read {value!r}; write "
                "${training_data_stats:NAME}"
            )
        name = match.group(1)
        if name not in STAT_NAMES:
            raise ValueError(
                f"{where.rstrip('.')}: unknown statistic {name!r}; known: "
                f"{', '.join(STAT_NAMES)}"
            )
        if name not in stats:
            raise ValueError(
                f"{where.rstrip('.')}: {name} is not available for this training set "
                f"(its labels are missing); available: {', '.join(sorted(stats))}"
            )
        return stats[name]
    return value
