"""Labelled structures → `AtomicGraph`s → batches.

Labels live in ``graph.properties`` under the names the models output
(``energy`` (S,) eV, ``forces`` (N, 3) eV/Å, ``stress`` (S, 3, 3) eV/Å³); a value a
structure lacks is NaN, so one batch can mix clusters (no stress) and bulk cells.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import ase
import ase.io
import numpy as np
import torch
from ase.data import atomic_numbers

from pes_calc import keys
from pes_calc.graph import AtomicGraph, batch_order, iterate_batches
from pes_calc.neighbors import atoms_to_graph

# batch_order and iterate_batches live in pes_calc.graph, importable from here too
__all__ = [
    "DEFAULT_KEYS",
    "DatasetError",
    "LabelKeys",
    "batch_order",
    "extract_labels",
    "iterate_batches",
    "labelled_graphs",
    "load_graphs",
    "read_structures",
    "species_in",
]

DEFAULT_KEYS = {"energy_key": "energy", "forces_key": "forces", "stress_key": "stress"}


class DatasetError(ValueError):
    """A dataset that cannot be used as asked: a missing file or label, a bad shape."""


@dataclass(frozen=True)
class LabelKeys:
    """Where each label sits in the file: ``atoms.info`` / ``atoms.arrays`` / the
    attached calculator's results. ``None`` means "this dataset has no such label"."""

    energy: str | None = "energy"
    forces: str | None = "forces"
    stress: str | None = "stress"

    @classmethod
    def from_config(cls, data: dict) -> LabelKeys:
        return cls(
            energy=data.get("energy_key", "energy"),
            forces=data.get("forces_key", "forces"),
            stress=data.get("stress_key", "stress"),
        )


def read_structures(path: str | os.PathLike, index: str = ":") -> list[ase.Atoms]:
    """All structures in an ASE-readable file (extxyz, ASE .traj, ...)."""
    if not os.path.isfile(path):
        raise DatasetError(f"no dataset file at {path}")
    try:
        structures = ase.io.read(os.fspath(path), index=index)
    except Exception as error:  # ASE raises many kinds for unreadable files
        raise DatasetError(f"cannot read {path} with ASE: {error}") from error
    if isinstance(structures, ase.Atoms):
        structures = [structures]
    if not structures:
        raise DatasetError(f"{path} holds no structures")
    return list(structures)


def _lookup(atoms: ase.Atoms, key: str):
    """A label from the calculator results, ``info`` or ``arrays``; None if absent."""
    if atoms.calc is not None and key in getattr(atoms.calc, "results", {}):
        return atoms.calc.results[key]
    if key in atoms.info:
        return atoms.info[key]
    if key in atoms.arrays:
        return atoms.arrays[key]
    return None


def _as_stress_matrix(value, where: str) -> np.ndarray:
    """ASE Voigt (6,), flat (9,) or (3, 3) stress → (3, 3)."""
    value = np.asarray(value, dtype=np.float64).reshape(-1)
    if value.size == 6:
        xx, yy, zz, yz, xz, xy = value
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    if value.size == 9:
        return value.reshape(3, 3)
    raise DatasetError(
        f"{where}: stress must have 6 (Voigt) or 9 values, got {value.size}"
    )


def extract_labels(
    structures: Sequence[ase.Atoms], label_keys: LabelKeys, name: str = "dataset"
) -> list[dict[str, np.ndarray]]:
    """Per-structure label dicts (energy (1,), forces (N, 3), stress (1, 3, 3)).

    A label found in no structure at all is an error when its key was set
    explicitly; the default ``forces``/``stress`` keys may be absent (energy-only
    data), which is reported once as a warning.
    """
    found: dict[str, list] = {}
    for label, key in (
        (keys.ENERGY, label_keys.energy),
        (keys.FORCES, label_keys.forces),
        (keys.STRESS, label_keys.stress),
    ):
        if key is None:
            continue
        values = [_lookup(atoms, key) for atoms in structures]
        if all(value is None for value in values):
            available = sorted(
                set(structures[0].info)
                | set(structures[0].arrays)
                | set(getattr(structures[0].calc, "results", {}) or {})
            )
            default = DEFAULT_KEYS[f"{label}_key"] == key
            if label == keys.ENERGY or not default:
                raise DatasetError(
                    f"{name}: no structure has the {label} key {key!r}; keys in the "
                    f"first structure: {', '.join(available)} (set {label}_key)"
                )
            warnings.warn(
                f"{name}: no {label} labels (key {key!r}); training without them",
                stacklevel=1,  # the default: the message names the file
            )
            continue
        found[label] = values

    labels: list[dict[str, np.ndarray]] = []
    for position, atoms in enumerate(structures):
        where = f"{name}, structure {position}"
        n = len(atoms)
        entry: dict[str, np.ndarray] = {}
        if keys.ENERGY in found:
            value = found[keys.ENERGY][position]
            entry[keys.ENERGY] = np.array(
                [np.nan if value is None else float(np.asarray(value).reshape(-1)[0])]
            )
        if keys.FORCES in found:
            value = found[keys.FORCES][position]
            forces = np.full((n, 3), np.nan)
            if value is not None:
                value = np.asarray(value, dtype=np.float64)
                if value.shape != (n, 3):
                    raise DatasetError(
                        f"{where}: forces have shape {value.shape}, expected ({n}, 3)"
                    )
                forces = value
            entry[keys.FORCES] = forces
        if keys.STRESS in found:
            value = found[keys.STRESS][position]
            stress = np.full((3, 3), np.nan)
            if value is not None:
                stress = _as_stress_matrix(value, where)
            entry[keys.STRESS] = stress[None]
        labels.append(entry)
    return labels


def species_in(structures: Sequence[ase.Atoms]) -> list[str]:
    """The chemical symbols present, ordered by atomic number."""
    symbols = {
        symbol for atoms in structures for symbol in atoms.get_chemical_symbols()
    }
    return sorted(symbols, key=lambda symbol: atomic_numbers[symbol])


def labelled_graphs(
    structures: Sequence[ase.Atoms],
    labels: Sequence[dict[str, np.ndarray]],
    species: Sequence[str],
    cutoff: float,
    dtype: torch.dtype = torch.float64,
    name: str = "dataset",
) -> list[AtomicGraph]:
    """One graph per structure, with its labels in ``properties``; a structure the
    model cannot take (unknown element, NaN positions, broken cell) is named."""
    graphs = []
    for position, (atoms, entry) in enumerate(zip(structures, labels, strict=True)):
        try:
            graph = atoms_to_graph(atoms, species, cutoff, dtype=dtype)
        except ValueError as error:
            raise DatasetError(f"{name}, structure {position}: {error}") from error
        graphs.append(
            graph._replace(
                properties={
                    name: torch.as_tensor(value, dtype=dtype)
                    for name, value in entry.items()
                }
            )
        )
    return graphs


def load_graphs(
    path: str | os.PathLike,
    species: Sequence[str],
    cutoff: float,
    label_keys: LabelKeys = LabelKeys(),
    dtype: torch.dtype = torch.float64,
) -> list[AtomicGraph]:
    """Read ``path`` and turn it into labelled graphs for a model's species/cutoff."""
    structures = read_structures(path)
    labels = extract_labels(structures, label_keys, name=str(path))
    return labelled_graphs(structures, labels, species, cutoff, dtype, name=str(path))
