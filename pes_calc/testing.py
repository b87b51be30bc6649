"""`check_potential`: the physics contract every pes_calc model must pass.

Run it on your own model or artefact::

    from pes_calc.testing import check_potential
    check_potential("model.pt")          # raises PotentialCheckError listing failures

Every check runs in float64 on small structures of the model's first species (two
species where it has them): forces against finite differences of the energy, stress
against finite strain of a triclinic cell, rotation / translation / permutation
invariance, supercell extensivity, batch = one by one, a 1-atom and a 0-edge
structure, a smooth cutoff, and inputs left untouched.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

import ase
import ase.build
import numpy as np
import torch

from pes_calc import keys
from pes_calc.artefacts import load_artefact
from pes_calc.graph import AtomicGraph, batch_graphs
from pes_calc.io import model_metadata
from pes_calc.llpr import LLPR
from pes_calc.neighbors import atoms_to_graph
from pes_calc.potential import Potential


class PotentialCheckError(AssertionError):
    """One or more contract checks failed; the message lists them."""


class Subject:
    """A model under test in float64, with what is needed to build its graphs."""

    def __init__(self, model: Potential | LLPR | str | os.PathLike):
        loaded: Any
        if isinstance(model, (str, os.PathLike)):
            loaded, metadata = load_artefact(model)
        else:
            metadata = model_metadata(model)
            loaded = copy.deepcopy(model)
        self.model = loaded.to(torch.float64).eval()
        self.species: list[str] = list(metadata["species"])
        self.cutoff = float(metadata["cutoff"])

    def graph(self, atoms: ase.Atoms) -> AtomicGraph:
        return atoms_to_graph(atoms, self.species, self.cutoff)

    def __call__(self, graph: AtomicGraph, derivatives: bool = True) -> dict:
        with torch.jit.optimized_execution(False):  # as the calculator runs it
            outputs = self.model(graph, derivatives, derivatives)
        return {k: v.detach().numpy() for k, v in outputs.items()}

    def energy(self, atoms: ase.Atoms) -> float:
        return float(self(self.graph(atoms), derivatives=False)[keys.ENERGY].sum())

    # structures: small, rattled, with every species the model has (up to two)
    def bulk(self, seed: int = 0) -> ase.Atoms:
        atoms = ase.build.bulk("Cu", "fcc", a=3.0, cubic=True) * (2, 1, 1)
        atoms.cell = atoms.cell.array + np.array(
            [[0.0, 0.2, 0.1], [0.3, 0.0, -0.2], [0.1, 0.25, 0.0]]
        )  # triclinic
        return self._decorate(atoms, seed)

    def slab(self, seed: int = 1) -> ase.Atoms:
        atoms = ase.build.fcc100("Cu", size=(2, 2, 2), a=3.0, vacuum=4.0)
        atoms.pbc = [True, True, False]
        return self._decorate(atoms, seed)

    def cluster(self, seed: int = 2) -> ase.Atoms:
        rng = np.random.default_rng(seed)
        positions = rng.uniform(0.0, 3.5, size=(6, 3))
        atoms = ase.Atoms("Cu6", positions=positions)
        return self._decorate(atoms, seed, rattle=0.0)

    def _decorate(self, atoms: ase.Atoms, seed: int, rattle: float = 0.1) -> ase.Atoms:
        rng = np.random.default_rng(seed)
        symbols = np.array(self.species[:2])[
            rng.integers(0, min(2, len(self.species)), len(atoms))
        ]
        atoms.set_chemical_symbols(list(symbols))
        if rattle:
            atoms.positions += rng.normal(0.0, rattle, size=atoms.positions.shape)
        return atoms


def random_rotation(seed: int) -> np.ndarray:
    """A random proper rotation matrix (QR of a Gaussian matrix, det = +1)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _close(name: str, actual, expected, atol: float, rtol: float = 1e-6) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape or not np.allclose(actual, expected, rtol, atol):
        error = (
            np.max(np.abs(actual - expected))
            if actual.shape == expected.shape
            else "shape"
        )
        raise PotentialCheckError(f"{name}: max deviation {error} (atol {atol})")


def numerical_forces(
    energy: Callable[[ase.Atoms], float], atoms: ase.Atoms, h: float = 1e-4
) -> np.ndarray:
    """(N, 3) forces -dE/dR by central differences of ``energy`` with step h (Å)."""
    forces = np.zeros((len(atoms), 3))
    for i in range(len(atoms)):
        for k in range(3):
            energies = []
            for step in (h, -h):
                displaced = atoms.copy()
                displaced.positions[i, k] += step
                energies.append(energy(displaced))
            forces[i, k] = -(energies[0] - energies[1]) / (2 * h)
    return forces


def numerical_stress(
    energy: Callable[[ase.Atoms], float], atoms: ase.Atoms, h: float = 1e-5
) -> np.ndarray:
    """(3, 3) stress (1/V) dE/dε, eV/Å³, by central differences of ``energy`` under
    symmetric strains of size h (dimensionless) of the cell and positions."""
    stress = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            energies = []
            for step in (h, -h):
                strain = np.eye(3)
                strain[a, b] += 0.5 * step
                strain[b, a] += 0.5 * step
                strained = atoms.copy()
                strained.set_cell(atoms.cell.array @ strain, scale_atoms=True)
                energies.append(energy(strained))
            stress[a, b] = (energies[0] - energies[1]) / (2 * h) / atoms.get_volume()
    return stress


def check_forces_finite_differences(subject: Subject) -> None:
    """Forces equal -dE/dR by central differences (h = 1e-5 Å), all periodicities."""
    for atoms in (subject.bulk(), subject.slab(), subject.cluster()):
        forces = subject(subject.graph(atoms))[keys.FORCES]
        # O(10) eV/Å forces of untrained models in dense cells need the small step
        numerical = numerical_forces(subject.energy, atoms, h=1e-5)
        _close(f"forces vs finite differences ({atoms.pbc})", forces, numerical, 1e-5)


def check_stress_finite_strain(subject: Subject) -> None:
    """Stress equals (1/V) dE/dε by central differences of a triclinic cell."""
    atoms = subject.bulk()
    stress = subject(subject.graph(atoms))[keys.STRESS][0]
    numerical = numerical_stress(subject.energy, atoms, h=1e-5)
    _close("stress vs finite strain", stress, numerical, 1e-6)


def check_invariances(subject: Subject) -> None:
    """Energy invariant and forces equivariant under rotation, inversion, translation
    and permutation (periodic and cluster)."""
    for atoms in (subject.bulk(), subject.cluster()):
        reference = subject(subject.graph(atoms))
        rotation = random_rotation(seed=3)
        rotated = atoms.copy()
        rotated.positions = atoms.positions @ rotation.T
        rotated.cell = atoms.cell.array @ rotation.T
        outputs = subject(subject.graph(rotated))
        _close(
            "energy under rotation", outputs[keys.ENERGY], reference[keys.ENERGY], 1e-8
        )
        _close(
            "forces under rotation",
            outputs[keys.FORCES],
            reference[keys.FORCES] @ rotation.T,
            1e-7,
        )
        # parity: E(3) includes the inversion r → -r
        inverted = atoms.copy()
        inverted.positions = -atoms.positions
        inverted.cell = -atoms.cell.array
        outputs = subject(subject.graph(inverted))
        _close(
            "energy under inversion", outputs[keys.ENERGY], reference[keys.ENERGY], 1e-8
        )
        _close(
            "forces under inversion",
            outputs[keys.FORCES],
            -reference[keys.FORCES],
            1e-7,
        )
        translated = atoms.copy()
        translated.positions += np.array([0.3, -1.7, 2.2])
        outputs = subject(subject.graph(translated))
        _close(
            "energy under translation",
            outputs[keys.ENERGY],
            reference[keys.ENERGY],
            1e-8,
        )
        order = np.random.default_rng(4).permutation(len(atoms))
        outputs = subject(subject.graph(atoms[order]))
        _close(
            "energy under permutation",
            outputs[keys.ENERGY],
            reference[keys.ENERGY],
            1e-8,
        )
        _close(
            "forces under permutation",
            outputs[keys.FORCES],
            reference[keys.FORCES][order],
            1e-8,
        )


def check_extensivity(subject: Subject) -> None:
    """A 2×1×1 supercell has twice the energy, the same per-atom energies and stress."""
    atoms = subject.bulk()
    single = subject(subject.graph(atoms))
    double = subject(subject.graph(atoms * (2, 1, 1)))
    _close("supercell energy", double[keys.ENERGY], 2 * single[keys.ENERGY], 1e-8)
    _close("supercell stress", double[keys.STRESS], single[keys.STRESS], 1e-8)


def check_batch_equals_single(subject: Subject) -> None:
    """A batch of structures gives the results of each structure on its own."""
    structures = [subject.bulk(), subject.slab(), subject.cluster()]
    graphs = [subject.graph(atoms) for atoms in structures]
    batched = subject(batch_graphs(graphs))
    singles = [subject(graph) for graph in graphs]
    for key in (keys.ENERGY, keys.ENERGIES, keys.FORCES, keys.STRESS):
        _close(
            f"batched {key}",
            batched[key],
            np.concatenate([s[key] for s in singles]),
            1e-8,
        )


def check_isolated_atoms(subject: Subject) -> None:
    """A 1-atom structure and atoms beyond each other's cutoff: zero forces, and
    energies independent of how far apart the atoms are."""
    atom = ase.Atoms(subject.species[:1], positions=[[0.0, 0.0, 0.0]])
    single = subject(subject.graph(atom))
    for key, shape in (
        (keys.ENERGY, (1,)),
        (keys.ENERGIES, (1,)),
        (keys.FORCES, (1, 3)),
    ):
        if single[key].shape != shape:
            raise PotentialCheckError(f"1-atom {key} has shape {single[key].shape}")
    _close("1-atom forces", single[keys.FORCES], np.zeros((1, 3)), 1e-12)
    far = 2.0 * subject.cutoff
    pair = ase.Atoms(subject.species[:1] * 2, positions=[[0, 0, 0], [far, 0, 0]])
    outputs = subject(subject.graph(pair))
    _close("0-edge energy", outputs[keys.ENERGY], 2 * single[keys.ENERGY], 1e-10)
    _close("0-edge forces", outputs[keys.FORCES], np.zeros((2, 3)), 1e-12)


def check_smooth_cutoff(subject: Subject) -> None:
    """Dimer energy and force go continuously to their separated values at the
    cutoff."""
    symbol = subject.species[0]
    cutoff = subject.cutoff

    def dimer(distance: float) -> dict:
        atoms = ase.Atoms([symbol, symbol], positions=[[0, 0, 0], [distance, 0, 0]])
        return subject(subject.graph(atoms))

    inside, outside = dimer(cutoff - 1e-6), dimer(cutoff + 1e-6)
    _close("energy across the cutoff", inside[keys.ENERGY], outside[keys.ENERGY], 1e-7)
    _close("force across the cutoff", inside[keys.FORCES], outside[keys.FORCES], 1e-5)


def check_inputs_not_mutated(subject: Subject) -> None:
    """The model leaves every tensor of its input graph unchanged."""
    graph = subject.graph(subject.bulk())
    graph = graph._replace(
        properties={"energy": torch.zeros(1, dtype=graph.positions.dtype)}
    )
    before: list[Any] = [
        {k: v.clone() for k, v in t.items()} if isinstance(t, dict) else t.clone()
        for t in graph
    ]
    subject(graph)
    new: Any
    for name, old, new in zip(AtomicGraph._fields, before, graph, strict=True):
        if isinstance(old, dict):
            same = old.keys() == new.keys() and all(
                torch.equal(old[k], new[k]) for k in old
            )
        else:
            same = torch.equal(old, new)
        if not same:
            raise PotentialCheckError(f"the model changed the input graph's {name}")
    if graph.positions.requires_grad:
        raise PotentialCheckError("the model set requires_grad on the input positions")


CHECKS: dict[str, Callable[[Subject], None]] = {
    "forces_finite_differences": check_forces_finite_differences,
    "stress_finite_strain": check_stress_finite_strain,
    "invariances": check_invariances,
    "extensivity": check_extensivity,
    "batch_equals_single": check_batch_equals_single,
    "isolated_atoms": check_isolated_atoms,
    "smooth_cutoff": check_smooth_cutoff,
    "inputs_not_mutated": check_inputs_not_mutated,
}


def check_potential(model: Potential | LLPR | str | os.PathLike) -> None:
    """Run every contract check on ``model`` (an object or a model file path).

    Raises `PotentialCheckError` naming each failed check; returns None on success.
    """
    subject = Subject(model)
    failures = []
    for name, check in CHECKS.items():
        try:
            check(subject)
        except PotentialCheckError as error:
            failures.append(f"{name}: {error}")
    if failures:
        raise PotentialCheckError("\n".join(failures))
