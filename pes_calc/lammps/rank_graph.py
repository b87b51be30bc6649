"""The graph of one rank's atoms, and the model's derivatives on it.

Nodes are the local atoms (first, in LAMMPS's order) and the kept ghosts that can
reach a local atom's energy within the model's message-passing layers; edges are
those whose centre can. Along spanned directions the cell's periodicity makes the
images (``edge_cell_shifts``), across sub-domain faces ghosts are explicit
coordinates. The neighbor list is built with a Verlet skin and reused until a
node moves more than half of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pes_calc import keys
from pes_calc.graph import AtomicGraph, edge_vectors
from pes_calc.lammps.domain import Box
from pes_calc.neighbors import check_geometry, neighbor_list, neighbor_list_torch


@dataclass
class RankGraph:
    """What stays fixed between neighbor-list builds."""

    atoms: np.ndarray
    """(n,) LAMMPS indices of the nodes: local atoms first, then ghosts."""
    edge_index: torch.Tensor
    edge_cell_shifts: torch.Tensor
    species: torch.Tensor
    built_at: np.ndarray
    """(n, 3) node positions when the list was built, Å."""
    own_local: np.ndarray
    """per ghost node: the local index of the same atom on this rank, else -1."""
    remote_slot: np.ndarray
    """per ghost node: its row among the remote atoms sent to their owners, else -1."""
    ghost_centres: bool
    """Some ghost is an edge centre (message passing across ranks)."""

    def moved_past(self, positions: np.ndarray, distance: float) -> bool:
        """Has a node moved more than ``distance`` (Å) since the build?"""
        moved = positions[self.atoms] - self.built_at
        return bool((moved**2).sum(axis=1).max(initial=0.0) > distance**2)


def build_rank_graph(
    positions: np.ndarray,
    species_of_atom: np.ndarray,
    nlocal: int,
    ghosts: np.ndarray,
    own_local: np.ndarray,
    remote_slot: np.ndarray,
    box: Box,
    cutoff: float,
    layers: int,
    device: torch.device,
    dtype: torch.dtype,
) -> RankGraph:
    """Neighbors within ``cutoff`` (model cutoff + skin, Å) of local atoms and the
    kept ``ghosts``, pruned to what reaches a local energy in ``layers`` steps.

    ``species_of_atom`` holds the model's species index of every LAMMPS atom;
    ``own_local`` and ``remote_slot`` are per kept ghost.
    """
    candidates = np.concatenate([np.arange(nlocal), ghosts])
    points = positions[candidates]
    check_geometry(points, box.cell, box.spanned)
    if device.type == "cuda":
        edges_t, shifts_t = neighbor_list_torch(
            torch.from_numpy(points).to(device),
            torch.from_numpy(box.cell).to(device),
            torch.from_numpy(box.spanned).to(device),
            cutoff,
        )
        edges, shifts = edges_t.cpu().numpy(), shifts_t.cpu().numpy()
    else:
        edges, shifts = neighbor_list(points, box.cell, box.spanned, cutoff)
    # hops from the local atoms along edges (centre → neighbor)
    hops = np.full(len(candidates), layers + 1, dtype=np.int64)
    hops[:nlocal] = 0
    for hop in range(1, layers + 1):
        reached = edges[1][hops[edges[0]] == hop - 1]
        hops[reached] = np.minimum(hops[reached], hop)
    keep_edges = hops[edges[0]] <= layers - 1
    nodes = np.flatnonzero(hops <= layers)  # locals first: they have hop 0
    renumber = np.full(len(candidates), -1, dtype=np.int64)
    renumber[nodes] = np.arange(len(nodes))
    edges = renumber[edges[:, keep_edges]]
    ghost_rows = nodes[nodes >= nlocal] - nlocal
    species = species_of_atom[candidates[nodes]]
    if np.any(species < 0):
        raise ValueError("an atom's LAMMPS type has no element in --types")
    return RankGraph(
        atoms=candidates[nodes],
        edge_index=torch.from_numpy(np.ascontiguousarray(edges)).to(device),
        edge_cell_shifts=torch.from_numpy(shifts[keep_edges]).to(device, dtype),
        species=torch.from_numpy(species).to(device),
        built_at=positions[candidates[nodes]].copy(),
        own_local=own_local[ghost_rows],
        remote_slot=remote_slot[ghost_rows],
        ghost_centres=bool(np.any(edges[0] >= nlocal)),
    )


def graph_now(
    rank_graph: RankGraph,
    positions: np.ndarray,
    box: Box,
    cutoff: float,
    dtype: torch.dtype,
) -> AtomicGraph:
    """The `AtomicGraph` at the current positions, edges shorter than ``cutoff``."""
    device = rank_graph.species.device
    node_positions = positions[rank_graph.atoms]
    if not np.all(np.isfinite(node_positions)):
        raise ValueError("LAMMPS positions contain NaN or infinite values")
    graph = AtomicGraph(
        positions=torch.from_numpy(node_positions).to(device, dtype),
        cell=torch.from_numpy(box.cell).to(device, dtype).unsqueeze(0),
        pbc=torch.from_numpy(box.spanned).to(device).unsqueeze(0),
        species=rank_graph.species,
        edge_index=rank_graph.edge_index,
        edge_cell_shifts=rank_graph.edge_cell_shifts,
        structure_index=torch.zeros(
            len(node_positions), dtype=torch.int64, device=device
        ),
        properties={},
    )
    keep = torch.linalg.vector_norm(edge_vectors(graph), dim=-1) < cutoff
    return graph._replace(
        edge_index=graph.edge_index[:, keep],
        edge_cell_shifts=graph.edge_cell_shifts[keep],
    )


@dataclass
class Derivatives:
    """A rank's share, in float64 numpy: forces on its nodes (eV/Å), local atoms'
    energies and uncertainties (eV), and ∂E/∂ε of its energy (3, 3), eV."""

    node_forces: np.ndarray
    energies: np.ndarray
    uncertainties: np.ndarray
    strain_gradient: np.ndarray


def model_derivatives(
    model: torch.nn.Module, graph: AtomicGraph, nlocal: int, volume: float
) -> Derivatives:
    """The artefact's own forces and stress: exact when only local atoms are edge
    centres (ghost atoms then add constants to the energy)."""
    with torch.jit.optimized_execution(False):
        outputs = model(graph, True, True)
    stress = _numpy(outputs[keys.STRESS])[0]
    return Derivatives(
        _numpy(outputs[keys.FORCES]),
        _numpy(outputs[keys.ENERGIES])[:nlocal],
        _uncertainties(outputs, nlocal),
        0.5 * (stress + stress.T) * volume,
    )


def local_energy_derivatives(
    model: torch.nn.Module, graph: AtomicGraph, nlocal: int
) -> Derivatives:
    """Derivatives of the local atoms' energies alone: where ghosts are edge centres,
    the model's own forces would count the ghosts' energies too."""
    positions = graph.positions.detach().requires_grad_(True)
    cell = graph.cell.detach().requires_grad_(True)
    with torch.jit.optimized_execution(False):
        outputs = model(graph._replace(positions=positions, cell=cell), False, False)
    local_energy = outputs[keys.ENERGIES][:nlocal].sum()
    position_gradient, cell_gradient = torch.autograd.grad(
        local_energy, [positions, cell], allow_unused=True
    )
    if position_gradient is None:
        position_gradient = torch.zeros_like(positions)
    if cell_gradient is None:
        cell_gradient = torch.zeros_like(cell)
    # ∂E/∂ε for r → r(1+ε), cell → cell(1+ε)
    strain_gradient = _numpy(
        positions.T @ position_gradient + cell[0].T @ cell_gradient[0]
    )
    return Derivatives(
        -_numpy(position_gradient),
        _numpy(outputs[keys.ENERGIES])[:nlocal],
        _uncertainties(outputs, nlocal),
        0.5 * (strain_gradient + strain_gradient.T),
    )


def per_atom_virial(model: Any, graph: AtomicGraph, nlocal: int) -> np.ndarray:
    """(nodes, 6) per-atom virial W_i, eV, in LAMMPS's order xx yy zz xy xz yz:
    -1/2 Σ over the edges e of atom i (as centre or neighbor) of sym(r_e ⊗ ∂E/∂r_e),
    with E the local atoms' energy. The rows sum to the rank's virial -∂E/∂ε.

    Needs the edge vectors as autograd inputs: a `Potential` (or `LLPR`) in eager or
    TorchScript form; an AOTInductor package's eager model.
    """
    potential = model.potential if hasattr(model, "potential") else model
    vectors = edge_vectors(graph).detach().requires_grad_(True)
    with torch.jit.optimized_execution(False):
        energies, _ = potential.energies_from_vectors(graph, vectors)
    (gradient,) = torch.autograd.grad(
        energies[:nlocal].sum(), [vectors], allow_unused=True
    )
    if gradient is None:
        gradient = torch.zeros_like(vectors)
    outer = vectors.detach().unsqueeze(2) * gradient.unsqueeze(1)  # (E, 3, 3)
    outer = 0.5 * (outer + outer.transpose(1, 2))
    rows, columns = [0, 1, 2, 0, 0, 1], [0, 1, 2, 1, 2, 2]
    half = -0.5 * outer[:, rows, columns].to(torch.float64)  # (E, 6)
    virial = torch.zeros(
        graph.positions.shape[0], 6, dtype=torch.float64, device=half.device
    )
    virial.index_add_(0, graph.edge_index[0], half)
    virial.index_add_(0, graph.edge_index[1], half)
    return virial.cpu().numpy()


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float64).numpy()


def _uncertainties(outputs: dict[str, torch.Tensor], nlocal: int) -> np.ndarray:
    if keys.ENERGIES_UNCERTAINTY in outputs:
        return _numpy(outputs[keys.ENERGIES_UNCERTAINTY])[:nlocal]
    return np.zeros(nlocal)
