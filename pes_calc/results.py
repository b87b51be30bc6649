"""Model outputs (tensors over a graph of one or more structures) → per-structure
results in ASE's names, units and shapes; the property names every engine shares.

One place for the rules: stress only where the cell has a volume (ASE's Voigt order,
eV/Å³), per-atom arrays split by structure, uncertainties as standard deviations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ase
import numpy as np
import torch
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import full_3x3_to_voigt_6_stress

from pes_calc import keys

Result = dict[str, Any]

BASIC_PROPERTIES = ("energy", "free_energy", "energies", "forces", "stress")
# LLPR models only; the ensemble-force ones cost extra backward passes
UNCERTAINTY_PROPERTIES = (
    keys.ENERGY_UNCERTAINTY,
    keys.ENERGIES_UNCERTAINTY,
    keys.ENERGY_ENSEMBLE,
    keys.FORCES_UNCERTAINTY,
    keys.FORCES_ENSEMBLE,
)
FORCE_ENSEMBLE_PROPERTIES = (keys.FORCES_UNCERTAINTY, keys.FORCES_ENSEMBLE)
ALL_PROPERTIES = (*BASIC_PROPERTIES, *UNCERTAINTY_PROPERTIES)
# what an energy-only model cannot give
DERIVED_PROPERTIES = ("forces", "stress", *FORCE_ENSEMBLE_PROPERTIES)
# what one calculator call fills for an LLPR model without ensemble forces
CHEAP_UNCERTAINTIES = (
    keys.ENERGY_UNCERTAINTY,
    keys.ENERGIES_UNCERTAINTY,
    keys.ENERGY_ENSEMBLE,
)
# per-atom outputs have the atoms on axis 0, except the ensemble's (M, N, 3)
PER_ATOM_AXIS = {
    keys.ENERGIES: 0,
    keys.FORCES: 0,
    keys.ENERGIES_UNCERTAINTY: 0,
    keys.FORCES_UNCERTAINTY: 0,
    keys.FORCES_ENSEMBLE: 1,
}
# cell volumes below this (Å³) count as none
SMALLEST_VOLUME = 1e-12


def has_volume(atoms: ase.Atoms) -> bool:
    """Whether stress is defined: a periodic direction and a cell with a volume."""
    return bool(np.any(atoms.pbc) and abs(atoms.cell.volume) > SMALLEST_VOLUME)


def split_outputs(
    outputs: Mapping[str, torch.Tensor],
    sizes: Sequence[int],
    with_volume: Sequence[bool],
    names: Sequence[str] | None = None,
) -> list[Result]:
    """Per-structure results from the outputs of one model call on a batch.

    ``sizes``: atoms per structure, in batch order; ``with_volume``: whether each
    has stress (`has_volume`); ``names``: the properties to keep (default: all
    in `ALL_PROPERTIES` that the model returned). Energies are floats (eV),
    arrays float64 numpy:
    ``energies`` (N,), ``forces`` (N, 3) eV/Å, ``stress`` (6,) eV/Å³,
    ``energy_ensemble`` (M,), ``forces_ensemble`` (M, N, 3).
    """
    if names is None:
        names = ALL_PROPERTIES
    # only what is kept crosses to numpy (models also return features, ...)
    arrays = {
        name: outputs[name].detach().to("cpu", torch.float64).numpy()
        for name in names
        if name in outputs
    }
    if keys.STRESS in arrays:
        arrays[keys.STRESS] = full_3x3_to_voigt_6_stress(arrays[keys.STRESS])
    bounds = np.cumsum([0, *sizes])
    results: list[Result] = []
    for position in range(len(sizes)):
        start, stop = bounds[position], bounds[position + 1]
        result: Result = {}
        for name, value in arrays.items():
            if name in PER_ATOM_AXIS:
                atom_slice = [slice(None)] * value.ndim
                atom_slice[PER_ATOM_AXIS[name]] = slice(start, stop)
                result[name] = value[tuple(atom_slice)].copy()
            elif name == keys.STRESS:
                if with_volume[position]:
                    result[name] = value[position].copy()
            elif name in (keys.ENERGY, keys.ENERGY_UNCERTAINTY):
                result[name] = float(value[position])
            elif name in UNCERTAINTY_PROPERTIES:
                result[name] = value[position].copy()
        if "free_energy" in names and keys.ENERGY in arrays:
            result["free_energy"] = float(arrays[keys.ENERGY][position])
        results.append(result)
    return results


def as_atoms(atoms: ase.Atoms, result: Result) -> ase.Atoms:
    """A copy of ``atoms`` holding ``result`` where ASE and extxyz look for it:
    the basic properties in a ``SinglePointCalculator``, uncertainties in ``info``
    (per structure) and ``arrays`` (per atom; ``forces_ensemble`` as (N, 3M),
    member k's forces in columns 3k to 3k+2)."""
    copy = atoms.copy()
    standard = {k: v for k, v in result.items() if k in BASIC_PROPERTIES}
    copy.calc = SinglePointCalculator(copy, **standard)
    for name, value in result.items():
        if name in standard:
            continue
        if name in (keys.ENERGY_UNCERTAINTY, keys.ENERGY_ENSEMBLE):
            copy.info[name] = value
        elif name == keys.FORCES_ENSEMBLE:  # extxyz holds 1-D/2-D per-atom arrays
            copy.arrays[name] = np.ascontiguousarray(
                value.transpose(1, 0, 2).reshape(len(copy), -1)
            )
        else:
            copy.arrays[name] = value
    return copy
