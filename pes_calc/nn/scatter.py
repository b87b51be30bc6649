"""Scatter-sum: reduce per-edge (or per-atom) rows onto atoms (or structures)."""

from typing import Optional, Sequence

import torch
from torch import Tensor


def scatter_sum(values: Tensor, index: Tensor, size: int) -> Tensor:
    """Sum rows of ``values`` (M, ...) into ``size`` bins given by ``index`` (M,).

    ``index_add`` broadcasts over trailing dimensions, unlike ``scatter_add``.
    """
    shape = [size] + list(values.shape[1:])
    out = torch.zeros(shape, dtype=values.dtype, device=values.device)
    return out.index_add(0, index, values)


def neighbor_normalization(
    species: Sequence[str], avg_num_neighbors: Optional[object]
) -> Tensor:
    """(T,) factors 1/√(avg_num_neighbors) per centre type (1 when not given)."""
    if avg_num_neighbors is None:
        values = [1.0] * len(species)
    elif isinstance(avg_num_neighbors, dict):
        missing = [s for s in species if s not in avg_num_neighbors]
        if missing:
            raise ValueError(f"avg_num_neighbors has no value for {', '.join(missing)}")
        values = [float(avg_num_neighbors[s]) for s in species]
    else:
        values = [float(avg_num_neighbors)] * len(species)
    if min(values) <= 0:
        raise ValueError("avg_num_neighbors must be positive")
    return torch.tensor(values, dtype=torch.float64).rsqrt()
