"""Dense neighbour slots: each atom's edges laid out as one row of a (N, K) block.

A per-edge quantity x (E, F) placed at (centre, rank) in a zero (N, K, F) buffer, K
the largest neighbour count (at least 2), turns sums over each atom's neighbours
into batched matrix products instead of scatters: no index tables along the feature
axis, and the backward pass gathers rows instead of scattering elements.

K depends on the data, which a compiled graph cannot size a buffer by: a compiled
caller passes it as the length of a placeholder tensor in the graph's properties
(`NEIGHBOR_SLOTS`, made by `slot_width_input`), a dynamic size of the graph.
"""

from typing import Dict, Tuple

import torch
from torch import Tensor

from pes_calc.graph import AtomicGraph, number_of_atoms

# properties key of the (K,) placeholder whose length is the slot width K
NEIGHBOR_SLOTS = "neighbor_slots"


def slot_width(centres: Tensor, num_atoms: int) -> int:
    """K: the largest number of edges of one centre, at least 2 (a width that may be
    1 would make compiled kernels branch on broadcasting)."""
    return _width(torch.bincount(centres, minlength=num_atoms))


def _width(counts: Tensor) -> int:
    """K from the (N,) edge counts per centre (2 without edges)."""
    if counts.numel() == 0:
        return 2
    return int(counts.max().clamp(min=2).item())


def slot_width_input(graph: AtomicGraph) -> Tensor:
    """The (K,) placeholder that tells a compiled graph its slot width."""
    width = slot_width(graph.edge_index[0], number_of_atoms(graph))
    return torch.zeros(width, dtype=torch.int8, device=graph.positions.device)


def neighbor_ranks(
    centres: Tensor, num_atoms: int, properties: Dict[str, Tensor]
) -> Tuple[Tensor, int]:
    """(E,) rank of each edge among its centre's edges (in edge order), and K
    (from the ``NEIGHBOR_SLOTS`` placeholder when the properties hold one)."""
    num_edges = centres.shape[0]
    # not bincount: its length depends on the data, which export cannot size
    counts = torch.zeros(num_atoms, dtype=centres.dtype, device=centres.device)
    counts = counts.index_add(0, centres, torch.ones_like(centres))
    placeholder = properties.get("neighbor_slots")  # NEIGHBOR_SLOTS (TorchScript)
    width = placeholder.shape[0] if placeholder is not None else _width(counts)
    sorted_centres, order = torch.sort(centres, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    sorted_ranks = (
        torch.arange(num_edges, device=centres.device) - starts[sorted_centres]
    )
    ranks = torch.empty_like(centres).index_copy(0, order, sorted_ranks)
    return ranks, width


def to_slots(
    values: Tensor, centres: Tensor, ranks: Tensor, num_atoms: int, width: int
) -> Tensor:
    """(N, K, ...) zero-padded rows of the per-edge ``values`` (E, ...)."""
    shape = [num_atoms, width] + list(values.shape[1:])
    padded = torch.zeros(shape, dtype=values.dtype, device=values.device)
    return padded.index_put((centres, ranks), values)
