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
