"""The periodic cells long-range electrostatics can sum, and reciprocal cells.

Shared by the eager sum (`pes_calc.nn.long_range`) and the export path
(`pes_calc.nn.long_range_export`). Cells are row vectors, in Å.
"""

import math
from typing import Tuple

import torch
from torch import Tensor


def check_periodic_cell(cell: Tensor, periodic: Tensor) -> None:
    """Raise ``ValueError`` for a periodic structure torch-pme cannot sum."""
    num_periodic = int(periodic.sum())
    if num_periodic == 1:
        raise ValueError(
            "long-range electrostatics supports 3 or 2 periodic directions, or none; "
            "this structure is periodic along one direction only"
        )
    if bool(torch.abs(torch.linalg.det(cell)) < 1e-6):
        raise ValueError(
            "long-range electrostatics needs a cell with volume: for a slab, give a "
            "cell vector along the non-periodic direction (with vacuum)"
        )
    if num_periodic == 2:
        axis = int(torch.argmin(periodic.to(torch.int64)))
        off_axis = torch.ones(3, dtype=torch.bool, device=cell.device)
        off_axis[axis] = False
        # torch-pme's slab correction reads Cartesian coordinates along `axis`
        misaligned = (
            torch.abs(cell[axis][off_axis]).max()
            + torch.abs(cell[off_axis][:, axis]).max()
        )
        if bool(misaligned > 1e-6):  # Å
            raise ValueError(
                "long-range electrostatics of a slab needs the non-periodic cell "
                f"vector along Cartesian axis {axis} and the periodic vectors "
                "perpendicular to it"
            )


def reciprocal_cells(cells: Tensor) -> Tuple[Tensor, Tensor]:
    """(..., 3, 3) reciprocal cells 2π (cell⁻¹)ᵀ, rows b_i = 2π (a_j × a_k) /
    (a_i · (a_j × a_k)), and the (...,) signed volumes, of row-vector cells."""
    a, b, c = cells[..., 0, :], cells[..., 1, :], cells[..., 2, :]
    crosses = torch.stack(
        [torch.linalg.cross(b, c), torch.linalg.cross(c, a), torch.linalg.cross(a, b)],
        dim=-2,
    )
    volumes = (a * crosses[..., 0, :]).sum(-1)
    return (2.0 * math.pi) * crosses / volumes[..., None, None], volumes
