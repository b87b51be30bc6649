"""Candidates: the structures MD was unsure about (`candidate`), which of them to
label (`select`, `fingerprint`) and their reference labels (`label_structure`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import ase
import numpy as np
from ase.calculators.calculator import PropertyNotImplementedError
from ase.neighborlist import neighbor_list
from ase.stress import voigt_6_to_full_3x3_stress

from pes_calc.train import LabelKeys

__all__ = [
    "FINGERPRINT_CUTOFF",
    "FINGERPRINT_NEIGHBORS",
    "candidate",
    "fingerprint",
    "label_structure",
    "select",
]

# fingerprint of a structure: each atom's nearest-neighbor distances (Å), sorted
FINGERPRINT_NEIGHBORS, FINGERPRINT_CUTOFF = 12, 6.0


def candidate(
    recorded: ase.Atoms, run: str, temperature: float, round_: int
) -> ase.Atoms:
    """A structure recorded in MD run ``run`` (at ``temperature`` K, in round
    ``round_``) with its model values renamed, so nothing reads them as labels."""
    atoms = ase.Atoms(
        recorded.numbers, recorded.positions, cell=recorded.cell, pbc=recorded.pbc
    )
    atoms.info.update(
        config_type="active_learning",
        active_learning_round=round_,
        md_run=run,
        md_step=int(recorded.info["step"]),
        temperature_K=temperature,
        uncertainty=float(recorded.info["uncertainty"]),
        uncertainty_measure=recorded.info["uncertainty_measure"],
        model_energy=float(recorded.get_potential_energy()),
    )
    atoms.arrays["model_forces"] = np.array(recorded.get_forces())
    return atoms


def select(
    candidates: list[ase.Atoms], max_count: int, selection: Mapping[str, Any]
) -> list[int]:
    """Indices of up to ``max_count`` candidates, most uncertain first (non-finite
    values last), skipping near-duplicates of those already chosen: one of the
    same run within ``min_separation_steps`` MD steps, or one whose `fingerprint`
    is within ``duplicate_tolerance`` Å RMS; at most ``max_per_run`` (if given)
    from one run."""

    def key(index: int) -> float:
        value = float(candidates[index].info["uncertainty"])
        return -value if math.isfinite(value) else math.inf

    prints = [fingerprint(atoms) for atoms in candidates]
    chosen: list[int] = []
    per_run: dict[str, int] = {}
    for index in sorted(range(len(candidates)), key=key):
        if len(chosen) >= max_count:
            break
        info = candidates[index].info
        run = info["md_run"]
        if selection["max_per_run"] and per_run.get(run, 0) >= selection["max_per_run"]:
            continue
        if any(
            candidates[j].info["md_run"] == run
            and abs(int(candidates[j].info["md_step"]) - int(info["md_step"]))
            < selection["min_separation_steps"]
            for j in chosen
        ):
            continue
        if any(
            _near(prints[index], prints[j], selection["duplicate_tolerance"])
            for j in chosen
        ):
            continue
        chosen.append(index)
        per_run[run] = per_run.get(run, 0) + 1
    return chosen


def fingerprint(atoms: ase.Atoms) -> tuple[tuple[bool, ...], np.ndarray]:
    """(pbc, sorted distances in Å from every atom to its 12 nearest neighbors
    within 6 Å, padded with 6 Å): invariant to rotations, translations and
    permutations."""
    first, distances = neighbor_list("id", atoms, FINGERPRINT_CUTOFF)
    table = np.full((len(atoms), FINGERPRINT_NEIGHBORS), FINGERPRINT_CUTOFF)
    for atom in range(len(atoms)):
        nearest = np.sort(distances[first == atom])[:FINGERPRINT_NEIGHBORS]
        table[atom, : len(nearest)] = nearest
    return tuple(bool(p) for p in atoms.pbc), np.sort(table.ravel())


def _near(a, b, tolerance: float) -> bool:
    """Two fingerprints of the same pbc and size within ``tolerance`` Å RMS."""
    return (
        a[0] == b[0]
        and a[1].shape == b[1].shape
        and bool(np.sqrt(np.mean((a[1] - b[1]) ** 2)) <= tolerance)
    )


def label_structure(
    atoms: ase.Atoms, reference: Any, label_keys: LabelKeys
) -> ase.Atoms:
    """A copy of ``atoms`` (no momenta, no model values) with the reference's
    energy (eV), forces (eV/Å) and, for a cell with a volume, stress (eV/Å³),
    under ``label_keys``. Raises if the reference fails or returns a non-finite
    value."""
    keep = {
        k: v
        for k, v in atoms.info.items()
        if k not in ("model_energy", "energy", "stress")
    }
    work = ase.Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    work.calc = reference
    labels: dict[str, np.ndarray] = {"energy": np.array(work.get_potential_energy())}
    if label_keys.forces is not None:
        labels["forces"] = np.array(work.get_forces())
    if label_keys.stress is not None and work.cell.volume > 1e-12:
        with contextlib.suppress(PropertyNotImplementedError):  # left out then
            labels["stress"] = voigt_6_to_full_3x3_stress(work.get_stress())
    bad = [name for name, value in labels.items() if not np.all(np.isfinite(value))]
    if bad:
        raise FloatingPointError(f"the reference returned non-finite {', '.join(bad)}")
    result = ase.Atoms(
        atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc, info=keep
    )
    for name, value in labels.items():
        key = getattr(label_keys, name)
        if name == "forces":
            result.arrays[key] = value
        elif key is not None:
            result.info[key] = float(value) if name == "energy" else value
    return result
