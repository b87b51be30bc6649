"""The interface of a compiled (AOTInductor) graph, shared by `pes_calc.compile`,
which traces it, and `pes_calc.artefacts`, which calls it: its flat inputs in order
(`flat_inputs`), its outputs (`COMPILED_OUTPUTS`), and the example graph it is traced
on and checked against (`example_graph`). Lengths in Å.
"""

from __future__ import annotations

from typing import Any

import ase
import numpy as np
import torch
from torch import Tensor

from pes_calc import keys
from pes_calc.graph import AtomicGraph, batch_graphs, graph_to
from pes_calc.neighbors import atoms_to_graph
from pes_calc.nn.long_range import LongRangeElectrostatics
from pes_calc.nn.long_range_export import export_input_names, export_inputs
from pes_calc.nn.neighbor_slots import slot_width_input

__all__ = [
    "COMPILED_OUTPUTS",
    "PER_ATOM_OUTPUTS",
    "example_graph",
    "flat_inputs",
    "long_range_module",
    "uses_neighbor_slots",
]

# outputs a compiled graph returns, in this order (those the model has)
COMPILED_OUTPUTS = (
    keys.ENERGY,
    keys.ENERGIES,
    keys.FORCES,
    keys.STRESS,
    keys.ENERGY_UNCERTAINTY,
    keys.ENERGIES_UNCERTAINTY,
    keys.ENERGY_ENSEMBLE,
)
# compiled outputs with one row per atom (the others: one per structure)
PER_ATOM_OUTPUTS = (keys.ENERGIES, keys.FORCES, keys.ENERGIES_UNCERTAINTY)


def flat_inputs(
    graph: AtomicGraph,
    long_range: dict[str, Any] | None = None,
    neighbor_slots: bool = False,
) -> tuple[Tensor, ...]:
    """The graph's tensors in the order a compiled graph takes them; with
    ``neighbor_slots`` then the (K,) placeholder of the slot width K
    (`pes_calc.nn.neighbor_slots`); with ``long_range`` (a package's
    ``long_range_inputs`` metadata) then the cell-dependent data of its Ewald or
    PME sum: k-vector indices, the PME mesh shape, pairs
    (`pes_calc.nn.long_range_export.export_inputs`)."""
    tensors: tuple[Tensor, ...] = (
        graph.positions,
        graph.cell,
        graph.pbc,
        graph.species,
        graph.edge_index,
        graph.edge_cell_shifts,
        graph.structure_index,
    )
    if neighbor_slots:
        tensors += (slot_width_input(graph),)
    if long_range is None:
        return tensors
    extra = export_inputs(graph, long_range)
    return tensors + tuple(extra[name] for name in export_input_names(long_range))


def uses_neighbor_slots(model: Any) -> bool:
    """Whether a module of the model sums over neighbour slots (its compiled graph
    then takes the slot width as an input)."""
    return any(getattr(m, "uses_neighbor_slots", False) for m in model.modules())


def long_range_module(model: Any) -> LongRangeElectrostatics | None:
    """The model's long-range electrostatics, if it has one."""
    for module in model.modules():
        if isinstance(module, LongRangeElectrostatics):
            return module
    return None


def example_graph(
    model: Any, dtype: torch.dtype, device: str | torch.device
) -> AtomicGraph:
    """Two small periodic structures holding every species, with edges.

    The tracing and the load-time check run on it. Two structures of more than
    one atom each, because export specialises sizes 0 and 1 to constants. A
    long-range model also gets a non-periodic cluster (its direct sum) and a slab
    (the 2D correction), so that every sum is traced and checked.
    """
    cutoff = float(model.cutoff)
    generator = np.random.default_rng(0)
    structures = []
    for repeats in (2, 3):
        # a jittered simple-cubic lattice at half the cutoff: every atom has neighbors
        spacing = 0.5 * cutoff
        grid = np.stack(np.meshgrid(*[np.arange(repeats)] * 3), -1).reshape(-1, 3)
        positions = spacing * (grid + 0.1 * generator.standard_normal(grid.shape))
        symbols = [model.species[k % len(model.species)] for k in range(len(grid))]
        atoms = ase.Atoms(
            symbols, positions=positions, cell=np.eye(3) * spacing * repeats, pbc=True
        )
        structures.append(atoms_to_graph(atoms, model.species, cutoff, dtype=dtype))
    if long_range_module(model) is not None:
        spacing = 0.45 * cutoff
        cluster = [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0.5]]
        slab = [[0, 0, 0], [1, 0, 0.2], [0, 1, 0.4], [1, 1, 0.1], [0.5, 0.5, 1]]
        for points, pbc in ((cluster, False), (slab, (True, True, False))):
            positions = spacing * (
                np.array(points) + 0.1 * generator.standard_normal((5, 3))
            )
            symbols = [model.species[k % len(model.species)] for k in range(5)]
            # the slab: 2 × 2 spacings in plane, 2 spacings of vacuum above it
            cell = np.diag([2.0, 2.0, 4.0]) * spacing if pbc else None
            atoms = ase.Atoms(symbols, positions=positions, cell=cell, pbc=pbc)
            structures.append(atoms_to_graph(atoms, model.species, cutoff, dtype=dtype))
    return graph_to(batch_graphs(structures), torch.device(device), dtype)
