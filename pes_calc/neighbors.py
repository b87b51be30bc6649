"""Neighbor lists from vesin, and the conversion ``ase.Atoms`` → `AtomicGraph`.

This is the only module that talks to vesin. The backend is chosen explicitly:
``"vesin"`` (numpy, CPU) or ``"vesin-torch"`` (torch tensors, CPU or CUDA); by default
the graph's device picks it — CPU graphs use numpy vesin, CUDA graphs vesin-torch.
"""

from __future__ import annotations

from typing import Literal, Sequence

import ase
import numpy as np
import torch
import vesin
from ase.data import atomic_numbers

from pes_calc.choices import as_device, as_dtype
from pes_calc.graph import AtomicGraph

Backend = Literal["vesin", "vesin-torch"]


class UnknownSpeciesError(ValueError):
    """An atom's element is not one the model was trained on."""


def species_indices(symbols: Sequence[str], species: Sequence[str]) -> np.ndarray:
    """Map chemical symbols to indices into the model's ``species`` list.

    Raises `UnknownSpeciesError` naming the unknown elements and the model's species.
    """
    lookup = {symbol: index for index, symbol in enumerate(species)}
    unknown = sorted(set(symbols) - lookup.keys(), key=lambda s: atomic_numbers[s])
    if unknown:
        raise UnknownSpeciesError(
            f"the structure contains {', '.join(unknown)}, which this model does not "
            f"know; its species are {', '.join(species)}"
        )
    return np.fromiter((lookup[s] for s in symbols), dtype=np.int64, count=len(symbols))


def check_geometry(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> None:
    """Raise ``ValueError`` for NaN/inf coordinates or a broken periodic cell."""
    if not np.all(np.isfinite(positions)):
        bad = np.flatnonzero(~np.all(np.isfinite(positions), axis=1))
        raise ValueError(f"positions of atoms {bad[:10].tolist()} are NaN or infinite")
    if not np.all(np.isfinite(cell)):
        raise ValueError("the cell contains NaN or infinite values")
    for axis in range(3):
        if pbc[axis] and np.linalg.norm(cell[axis]) == 0.0:
            raise ValueError(
                f"cell direction {axis} is periodic but its cell vector is zero; "
                "set a cell or turn periodicity off in that direction"
            )
    if np.all(pbc) and abs(np.linalg.det(cell)) < 1e-12:
        raise ValueError("the cell is periodic in all directions but has no volume")


def neighbor_list(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
) -> tuple[np.ndarray, np.ndarray]:
    """Full neighbor list with numpy vesin.

    Returns the (2, E) int64 edge index (centre, neighbor) and the (E, 3) int64
    cell shifts such that r_ij = R_j - R_i + S_ij @ cell.
    """
    calculator = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
    i, j, shifts = calculator.compute(
        points=positions, box=cell, periodic=[bool(p) for p in pbc], quantities="ijS"
    )
    edge_index = np.stack([i.astype(np.int64), j.astype(np.int64)])
    return edge_index, shifts.astype(np.int64)


def neighbor_list_torch(
    positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, cutoff: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full neighbor list with vesin-torch, on the tensors' device (CPU or CUDA)."""
    try:
        from vesin_torch import NeighborList
    except ImportError as error:  # its wheels are tied to torch versions
        raise ImportError(
            "the 'vesin-torch' neighbor-list backend needs the vesin-torch package "
            f"built for torch {torch.__version__}: pip install vesin-torch"
        ) from error
    calculator = NeighborList(cutoff=float(cutoff), full_list=True)
    i, j, shifts = calculator.compute(
        points=positions, box=cell, periodic=pbc, quantities="ijS"
    )
    edge_index = torch.stack([i.to(torch.int64), j.to(torch.int64)])
    return edge_index, shifts.to(torch.int64)


def atoms_to_graph(
    atoms: ase.Atoms,
    species: Sequence[str],
    cutoff: float,
    *,
    dtype: torch.dtype | str = torch.float64,
    device: torch.device | str = "cpu",
    backend: Backend | None = None,
) -> AtomicGraph:
    """Build the graph of one structure with all edges shorter than ``cutoff`` (Å).

    Parameters
    ----------
    atoms
        The structure; full, mixed or no periodicity, any triclinic cell.
    species
        The model's chemical symbols, in type order.
    cutoff
        Neighbor cutoff radius in Å (a model's cutoff, plus any Verlet skin).
    dtype, device
        Of the float fields of the graph.
    backend
        ``"vesin"`` (numpy, CPU) or ``"vesin-torch"``; ``None`` picks vesin-torch on
        CUDA and vesin on CPU.
    """
    device = as_device(device) or torch.device("cpu")
    dtype = as_dtype(dtype) or torch.float64
    backend = backend or ("vesin-torch" if device.type == "cuda" else "vesin")
    positions = np.asarray(atoms.positions, dtype=np.float64)
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    pbc = np.asarray(atoms.pbc, dtype=bool)
    check_geometry(positions, cell, pbc)
    type_index = species_indices(atoms.get_chemical_symbols(), species)

    positions_t = torch.tensor(positions, dtype=dtype, device=device)
    cell_t = torch.tensor(cell, dtype=dtype, device=device)
    pbc_t = torch.tensor(pbc, device=device)
    if backend == "vesin":
        edges, shifts = neighbor_list(positions, cell, pbc, cutoff)
        edge_index = torch.from_numpy(edges).to(device)
        edge_cell_shifts = torch.from_numpy(shifts).to(device=device, dtype=dtype)
    elif backend == "vesin-torch":
        # vesin-torch works in the positions' dtype; float64 keeps edges exact
        edge_index, int_shifts = neighbor_list_torch(
            positions_t.double(), cell_t.double(), pbc_t, cutoff
        )
        edge_cell_shifts = int_shifts.to(dtype)
    else:
        raise ValueError(f"unknown neighbor-list backend {backend!r}")
    return AtomicGraph(
        positions=positions_t,
        cell=cell_t.unsqueeze(0),
        pbc=pbc_t.unsqueeze(0),
        species=torch.from_numpy(type_index).to(device),
        edge_index=edge_index,
        edge_cell_shifts=edge_cell_shifts,
        structure_index=torch.zeros(len(atoms), dtype=torch.int64, device=device),
        properties={},
    )
