"""Helpers shared by the architecture tests (importable as ``helpers``)."""

import ase
import numpy as np

from pes_calc.neighbors import atoms_to_graph


def run(model, atoms: ase.Atoms, derivatives: bool = True) -> dict:
    """Numpy outputs of ``model`` on ``atoms``, in the model's dtype."""
    dtype = next(iter(model.state_dict().values())).dtype
    graph = atoms_to_graph(atoms, model.species, model.cutoff, dtype=dtype)
    outputs = model(graph, derivatives, derivatives)
    return {k: v.detach().numpy() for k, v in outputs.items()}


def bulk(symbols=("Cu", "Ag", "Cu", "Ag")) -> ase.Atoms:
    """A rattled 4-atom cubic fcc cell (a = 3.7 Å) with the given symbols."""
    atoms = ase.Atoms(
        list(symbols),
        scaled_positions=[[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]],
        cell=np.eye(3) * 3.7,
        pbc=True,
    )
    atoms.rattle(0.1, seed=3)
    return atoms


def emt_structures(count: int, seed: int, cluster: bool = True) -> list:
    """Rattled, strained 8-atom Cu cells labelled with EMT (energy, forces,
    stress), plus one non-periodic 4-atom cluster without stress if ``cluster``."""
    from ase.build import bulk as ase_bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    structures = []
    for _ in range(count):
        atoms = ase_bulk(
            "Cu", "fcc", a=3.61 * (1 + 0.02 * rng.standard_normal()), cubic=True
        )
        atoms = atoms.repeat((2, 1, 1))
        atoms.rattle(0.1, seed=int(rng.integers(1 << 30)))
        atoms.calc = EMT()
        labels = {
            "energy": atoms.get_potential_energy(),
            "forces": atoms.get_forces(),
            "stress": atoms.get_stress(),
        }
        atoms.calc = SinglePointCalculator(atoms, **labels)
        structures.append(atoms)
    if cluster:
        atoms = ase_bulk("Cu", "fcc", a=3.61, cubic=True)
        atoms.pbc = False
        atoms.cell = np.zeros((3, 3))
        atoms.rattle(0.05, seed=seed)
        atoms.calc = EMT()
        labels = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
        atoms.calc = SinglePointCalculator(atoms, **labels)
        structures.append(atoms)
    return structures
