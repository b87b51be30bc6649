"""`AtomicGraph`: the one data structure every model, loss and calculator reads.

A graph holds one or more structures. A single structure is a batch of one, so no
function here branches on "batched or not". Everything a model calls is a free
function over the graph, so the graph stays a plain TorchScript record.

>>> import ase.build
>>> from pes_calc.neighbors import atoms_to_graph
>>> graph = atoms_to_graph(ase.build.bulk("Cu", "fcc", a=3.6), ["Cu"], cutoff=3.0)
>>> graph.positions.shape, graph.edge_index.shape, number_of_structures(graph)
(torch.Size([1, 3]), torch.Size([2, 12]), 1)
"""

import math
from collections.abc import Iterator, Sequence
from typing import Dict, List, NamedTuple

import torch
from torch import Tensor


class AtomicGraph(NamedTuple):
    """Atoms, their neighbors and the cells of one or more structures.

    Units are Å throughout. N atoms, E directed edges, S structures.
    """

    positions: Tensor
    """(N, 3) float: Cartesian positions, Å."""
    cell: Tensor
    """(S, 3, 3) float: ASE row-vector cells, Å; zeros along non-periodic axes are
    allowed."""
    pbc: Tensor
    """(S, 3) bool: periodicity of each cell direction."""
    species: Tensor
    """(N,) int64: index of each atom's element in the model's species list."""
    edge_index: Tensor
    """(2, E) int64: (centre i, neighbor j) per directed edge; both i→j and j→i."""
    edge_cell_shifts: Tensor
    """(E, 3) float: integer cell shifts S with r_ij = R_j - R_i + S @ cell."""
    structure_index: Tensor
    """(N,) int64: which structure each atom belongs to, sorted ascending."""
    properties: Dict[str, Tensor]
    """Labels for training and evaluation, empty at inference: ``"energy"`` (S,) eV,
    ``"forces"`` (N, 3) eV/Å, ``"stress"`` (S, 3, 3) eV/Å³. A value missing for some
    structure or atom is NaN there, so batches of mixed data keep one shape."""


def number_of_atoms(graph: AtomicGraph) -> int:
    """Total number of atoms N over all structures."""
    return graph.positions.shape[0]


def number_of_structures(graph: AtomicGraph) -> int:
    """Number of structures S in the graph (one cell per structure)."""
    return graph.cell.shape[0]


def number_of_edges(graph: AtomicGraph) -> int:
    """Number of directed edges E."""
    return graph.edge_index.shape[1]


def edge_vectors(graph: AtomicGraph) -> Tensor:
    """(E, 3) vectors r_ij = R_j - R_i + S_ij @ cell, Å, from centre to neighbor."""
    i, j = graph.edge_index[0], graph.edge_index[1]
    # each edge takes the cell of its centre atom's structure
    edge_cells = graph.cell[graph.structure_index[i]]  # (E, 3, 3)
    shifts = torch.bmm(graph.edge_cell_shifts.unsqueeze(1), edge_cells).squeeze(1)
    return graph.positions[j] - graph.positions[i] + shifts


def sum_per_structure(values: Tensor, graph: AtomicGraph) -> Tensor:
    """Sum per-atom ``values`` (N, ...) into per-structure totals (S, ...)."""
    shape = [number_of_structures(graph)] + list(values.shape[1:])
    totals = torch.zeros(shape, dtype=values.dtype, device=values.device)
    return totals.index_add(0, graph.structure_index, values)


def atoms_per_structure(graph: AtomicGraph) -> Tensor:
    """(S,) int64 number of atoms in each structure."""
    return torch.bincount(graph.structure_index, minlength=number_of_structures(graph))


def with_positions_and_cell(
    graph: AtomicGraph, positions: Tensor, cell: Tensor
) -> AtomicGraph:
    """The same graph with new positions and cells (e.g. strained copies)."""
    return AtomicGraph(
        positions=positions,
        cell=cell,
        pbc=graph.pbc,
        species=graph.species,
        edge_index=graph.edge_index,
        edge_cell_shifts=graph.edge_cell_shifts,
        structure_index=graph.structure_index,
        properties=graph.properties,
    )


def batch_graphs(graphs: List[AtomicGraph]) -> AtomicGraph:
    """Join several graphs into one, offsetting atom and structure indices.

    All graphs must carry the same label names (a dataset fills gaps with NaN)."""
    if len(graphs) == 0:
        raise ValueError("batch_graphs needs at least one graph")
    names = set(graphs[0].properties)
    if any(set(g.properties) != names for g in graphs):
        raise ValueError("batch_graphs needs graphs that carry the same properties")
    atom_offset = 0
    structure_offset = 0
    edge_indices: List[Tensor] = []
    structure_indices: List[Tensor] = []
    for graph in graphs:
        edge_indices.append(graph.edge_index + atom_offset)
        structure_indices.append(graph.structure_index + structure_offset)
        atom_offset += number_of_atoms(graph)
        structure_offset += number_of_structures(graph)
    return AtomicGraph(
        positions=torch.cat([g.positions for g in graphs]),
        cell=torch.cat([g.cell for g in graphs]),
        pbc=torch.cat([g.pbc for g in graphs]),
        species=torch.cat([g.species for g in graphs]),
        edge_index=torch.cat(edge_indices, dim=1),
        edge_cell_shifts=torch.cat([g.edge_cell_shifts for g in graphs]),
        structure_index=torch.cat(structure_indices),
        # per-atom and per-structure labels both stack along their first axis
        properties={
            name: torch.cat([g.properties[name] for g in graphs])
            for name in graphs[0].properties
        },
    )


def graph_to(
    graph: AtomicGraph, device: torch.device, dtype: torch.dtype
) -> AtomicGraph:
    """Move a graph to ``device`` and cast its float fields to ``dtype``."""
    return AtomicGraph(
        positions=graph.positions.to(device=device, dtype=dtype),
        cell=graph.cell.to(device=device, dtype=dtype),
        pbc=graph.pbc.to(device=device),
        species=graph.species.to(device=device),
        edge_index=graph.edge_index.to(device=device),
        edge_cell_shifts=graph.edge_cell_shifts.to(device=device, dtype=dtype),
        structure_index=graph.structure_index.to(device=device),
        properties={
            name: value.to(device=device, dtype=dtype)
            if value.is_floating_point()
            else value.to(device=device)
            for name, value in graph.properties.items()
        },
    )


def batch_order(
    num_graphs: int,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> list[list[int]]:
    """Indices of the graphs in each batch this process handles in ``epoch``.

    The order depends only on (seed, epoch), so a resumed run sees the same batches
    as an uninterrupted one. With several processes the order is padded by wrapping
    around so that every rank gets the same number of batches (DDP needs that).
    """
    if shuffle:
        generator = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
        order = torch.randperm(num_graphs, generator=generator).tolist()
    else:
        order = list(range(num_graphs))
    per_rank = math.ceil(num_graphs / world_size)
    order = (order * (per_rank * world_size // max(num_graphs, 1) + 1))[
        : per_rank * world_size
    ]
    mine = order[rank::world_size]
    return [
        mine[start : start + batch_size] for start in range(0, len(mine), batch_size)
    ]


def iterate_batches(
    graphs: Sequence[AtomicGraph],
    order: list[list[int]],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Iterator[AtomicGraph]:
    """The batches named by ``order``, as single graphs on ``device`` in ``dtype``."""
    device = torch.device(device)
    for indices in order:
        yield graph_to(batch_graphs([graphs[i] for i in indices]), device, dtype)


def select_structures(graph: AtomicGraph, structures: List[int]) -> AtomicGraph:
    """The graph of some of ``graph``'s structures (ascending indices), renumbered;
    labels (``properties``) are dropped."""
    chosen = torch.zeros(
        number_of_structures(graph), dtype=torch.bool, device=graph.cell.device
    )
    chosen[torch.tensor(structures, dtype=torch.long, device=chosen.device)] = True
    atoms = chosen[graph.structure_index]
    edges = atoms[graph.edge_index[0]]
    new_atom = torch.cumsum(atoms.to(torch.long), 0) - 1
    new_structure = torch.cumsum(chosen.to(torch.long), 0) - 1
    return AtomicGraph(
        positions=graph.positions[atoms],
        cell=graph.cell[chosen],
        pbc=graph.pbc[chosen],
        species=graph.species[atoms],
        edge_index=new_atom[graph.edge_index[:, edges]],
        edge_cell_shifts=graph.edge_cell_shifts[edges],
        structure_index=new_structure[graph.structure_index[atoms]],
        properties={},
    )
