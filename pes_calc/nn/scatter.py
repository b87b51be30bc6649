"""Scatter-sum: reduce per-edge (or per-atom) rows onto atoms (or structures)."""

import torch
from torch import Tensor


def scatter_sum(values: Tensor, index: Tensor, size: int) -> Tensor:
    """Sum rows of ``values`` (M, ...) into ``size`` bins given by ``index`` (M,).

    ``index_add`` broadcasts over trailing dimensions, unlike ``scatter_add``.
    """
    shape = [size] + list(values.shape[1:])
    out = torch.zeros(shape, dtype=values.dtype, device=values.device)
    return out.index_add(0, index, values)
