"""The AOTInductor export path of `LongRangeElectrostatics`: the cell-dependent
integer data computed outside the compiled graph, and the sums that read it.

An exported graph cannot hold shapes that depend on the cell's values (Ewald's
k-vector count, PME's mesh, the direct sum's pairs), so `export_inputs` computes that
integer data outside the graph, and after `LongRangeElectrostatics.prepare_for_export`
the module sums with `exported_energies`, which reads it from ``graph.properties``:
Ewald's integer indices n with k = 2π n (cell⁻¹)ᵀ from the strained cell (any batch,
summed densely over the batch's (k, atom) pairs, masked to each structure), PME's
mesh as the shape of an input (one periodic structure per call), the direct-sum
pairs, and torch-pme's self, background and slab terms, batched. Its numbers are
torch-pme's (tests/test_compile_long_range.py).

Units: Å, e, eV, as in `pes_calc.nn.long_range`.
"""

import math
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor
from torchpme.lib.kvectors import get_ns_mesh

from pes_calc.graph import AtomicGraph
from pes_calc.nn.long_range_cells import check_periodic_cell, reciprocal_cells
from pes_calc.nn.scatter import scatter_sum

if TYPE_CHECKING:
    from pes_calc.nn.long_range import LongRangeElectrostatics

# the cell-dependent integer data of an exported (AOTInductor) model, computed
# outside its graph by `export_inputs` and passed in ``graph.properties``
KVECTORS = "long_range_kvectors"  # (K, 3) float: integer reciprocal indices n
KVECTOR_STRUCTURE = "long_range_kvector_structure"  # (K,) int64: n's structure
DIRECT_PAIRS = "long_range_direct_pairs"  # (2, D) int64: pairs, non-periodic
DIRECT_MASK = "long_range_direct_mask"  # (D,) float: 1, or 0 for the padding pair
MESH = "long_range_mesh"  # (n_x, n_y, n_z), values unused: PME's mesh, as a shape
EWALD_INPUTS = (KVECTORS, KVECTOR_STRUCTURE, DIRECT_PAIRS, DIRECT_MASK)
PME_INPUTS = (MESH, DIRECT_PAIRS, DIRECT_MASK)


def export_input_names(spec: Dict[str, Union[str, float]]) -> List[str]:
    """The keys `export_inputs` returns for ``spec``, in the compiled order."""
    return list(EWALD_INPUTS if spec["method"] == "ewald" else PME_INPUTS)


def export_inputs(
    graph: AtomicGraph, spec: Dict[str, Union[str, float]]
) -> Dict[str, Tensor]:
    """The cell-dependent data `LongRangeElectrostatics`'s exported graph takes in
    ``graph.properties``, for ``spec`` (`LongRangeElectrostatics.export_spec`).

    Ewald (keys `EWALD_INPUTS`), for any batch: per periodic structure torch-pme's
    k-vector set, the integer indices
    n of the full n_x × n_y × n_z grid, n_a = ⌈|a| / λ⌉ for cell vector a and
    wavelength λ = ``kspace_resolution``, in torch-pme's order (k = 0 included; its
    kernel is 0) and their structure; per non-periodic
    structure every atom pair once. Each list gets one inert padding entry when it
    would be empty, since the compiled graph takes no size-0 inputs.

    PME (keys `PME_INPUTS`), for a graph with at most one periodic structure: an
    uninitialised tensor whose shape is that structure's mesh (torch-pme's
    ``get_ns_mesh``: powers of 2), and the direct-sum pairs. The cells are checked
    as the eager sum checks them (``ValueError``)."""
    kspace_resolution = float(spec["kspace_resolution"])
    ewald = spec["method"] == "ewald"
    mesh: Optional[Tensor] = None
    device = graph.positions.device
    counts: List[int] = torch.bincount(
        graph.structure_index, minlength=graph.cell.shape[0]
    ).tolist()
    periodic: List[bool] = graph.pbc.any(dim=1).tolist()
    k_cutoff = 2 * torch.pi / kspace_resolution
    indices: List[Tensor] = []
    k_structures: List[Tensor] = []
    direct_pairs: List[Tensor] = []
    start = 0
    for s, count in enumerate(counts):
        if not periodic[s]:
            direct_pairs.append(
                torch.triu_indices(count, count, 1, device=device) + start
            )
            start += count
            continue
        cell = graph.cell[s].detach()
        check_periodic_cell(cell, graph.pbc[s])
        if not ewald:
            if mesh is not None:
                raise ValueError(
                    "export_inputs for PME takes one periodic structure per graph"
                )
            ns_mesh: List[int] = get_ns_mesh(cell, kspace_resolution).tolist()
            mesh = torch.empty(ns_mesh, dtype=graph.positions.dtype, device=device)
            start += count
            continue
        # torch-pme's rule, in the cell's dtype (EwaldCalculator._compute_kspace)
        basis_norms = torch.linalg.norm(cell, dim=1)
        ns: List[int] = (
            torch.ceil(k_cutoff * basis_norms / 2 / torch.pi).long().tolist()
        )
        # fftfreq(n) · n: 0, 1, ..., -2, -1
        axes = [
            torch.fft.ifftshift(torch.arange(n, device=device) - n // 2) for n in ns
        ]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
        size = grid.shape[0]
        indices.append(grid.to(graph.positions.dtype))
        k_structures.append(torch.full((size,), s, dtype=torch.long, device=device))
        start += count
    dtype = graph.positions.dtype
    if not indices:  # k = 0 of structure 0: its kernel is 0
        indices.append(torch.zeros((1, 3), dtype=dtype, device=device))
        k_structures.append(torch.zeros(1, dtype=torch.long, device=device))
    pairs = torch.cat(direct_pairs, dim=1) if direct_pairs else None
    if pairs is None or pairs.shape[1] == 0:
        pairs = torch.zeros((2, 1), dtype=torch.long, device=device)
        mask = torch.zeros(1, dtype=dtype, device=device)
    else:
        mask = torch.ones(pairs.shape[1], dtype=dtype, device=device)
    if not ewald:
        if mesh is None:  # no periodic structure: any mesh, masked out
            mesh = torch.empty((2, 2, 2), dtype=dtype, device=device)
        return {MESH: mesh, DIRECT_PAIRS: pairs, DIRECT_MASK: mask}
    return {
        KVECTORS: torch.cat(indices),
        KVECTOR_STRUCTURE: torch.cat(k_structures),
        DIRECT_PAIRS: pairs,
        DIRECT_MASK: mask,
    }


def exported_energies(
    module: "LongRangeElectrostatics",
    charges: Tensor,
    graph: AtomicGraph,
    lengths: Tensor,
) -> Tensor:
    """(N,) energies (eV) of `LongRangeElectrostatics.forward` from neutral
    ``charges`` (N,) and edge lengths (E,) for a batch of any structures at once,
    with the cell-dependent integer data (k-vector indices, pairs) from
    ``graph.properties`` (`export_inputs`): torch-pme's Ewald sum (the same
    k-vectors, kernel, self, background and slab terms) and the direct sum, with no
    shape that depends on the cell's values, so that one exported graph serves every
    cell. k = 2π n (cell⁻¹)ᵀ from the (strained) cell keeps forces and stress
    exact."""
    inputs = graph.properties
    potential = module.kspace.potential
    positions, structure = graph.positions, graph.structure_index
    num_atoms, num_structures = positions.shape[0], graph.cell.shape[0]
    periodic = graph.pbc.any(dim=1)  # (S,)
    periodic_atoms = periodic[structure].to(charges.dtype)

    # non-periodic structures: v over every pair (one padding pair, masked)
    i, j = inputs[DIRECT_PAIRS][0], inputs[DIRECT_PAIRS][1]
    mask = inputs[DIRECT_MASK]
    separation = positions[j] - positions[i]
    # the padding pair is an atom with itself: distance 1, not a 0/0 slope
    distances = torch.sqrt((separation * separation).sum(-1) + (1.0 - mask))
    kernel = module.pair_kernel(distances) * mask
    field = scatter_sum(charges[j] * kernel, i, num_atoms) + scatter_sum(
        charges[i] * kernel, j, num_atoms
    )
    direct = 0.5 * charges * field

    # periodic structures, real space: torch-pme's pair term over the edges
    centres, neighbors = graph.edge_index[0], graph.edge_index[1]
    pair = potential.sr_from_dist(lengths) * periodic_atoms[centres]
    real = 0.5 * scatter_sum(charges[neighbors] * pair, centres, num_atoms)

    # k-space, with each atom's and each k-vector's own copy of its cell (one
    # gather from the strained cells: gathers of per-structure results made
    # AOTInductor's fused backward pass wrong); non-periodic: a unit cell
    eye = torch.eye(3, dtype=positions.dtype, device=positions.device)
    atom_cells = torch.where(
        periodic[structure][:, None, None], graph.cell[structure], eye
    )
    _, atom_volumes = reciprocal_cells(atom_cells)
    volume = torch.abs(atom_volumes)  # (N,)
    if module.use_ewald:
        kspace = _ewald_kspace(module, charges, graph, periodic)
    else:
        kspace = _pme_kspace(module, charges, graph, periodic)
    inverse_volume = 1.0 / volume
    total = scatter_sum(charges, structure, num_structures)[structure]
    # torch-pme's self and background terms, as numbers (inductor cannot lower
    # powers of its 0-d buffers, which tracing makes constants)
    smearing, prefactor = _smearing_and_prefactor(module)
    self_term = prefactor * math.sqrt(2.0 / math.pi) / smearing
    background = prefactor * math.pi * smearing**2
    reciprocal_potential = (
        kspace * inverse_volume
        - charges * self_term
        - 2.0 * background * total * inverse_volume
        + _slab_correction(module, charges, graph, atom_cells, volume)
    )
    coulomb = charges * (real + 0.5 * reciprocal_potential)
    return direct + periodic_atoms * coulomb


def _ewald_kspace(
    module: "LongRangeElectrostatics",
    charges: Tensor,
    graph: AtomicGraph,
    periodic: Tensor,
) -> Tensor:
    """(N,) Σ_k G(k) Re[e^{-ik·r_i} Σ_j q_j e^{ik·r_j}] over each periodic
    structure's k-vectors (torch-pme's Ewald sum before 1/V)."""
    inputs, positions = graph.properties, graph.positions
    n, k_structure = inputs[KVECTORS], inputs[KVECTOR_STRUCTURE]
    eye = torch.eye(3, dtype=positions.dtype, device=positions.device)
    k_cells = torch.where(
        periodic[k_structure][:, None, None], graph.cell[k_structure], eye
    )
    reciprocal, _ = reciprocal_cells(k_cells)  # (K, 3, 3)
    kvectors = torch.bmm(n.unsqueeze(1), reciprocal).squeeze(1)
    kernel_k = _kernel_from_k_sq(module, (kvectors * kvectors).sum(-1))  # (K,)
    # every (k, atom) pair of the batch, masked to those of one structure: dense
    # products and sums like torch-pme's (a formulation with scatters over
    # (k, atom) pair lists came out wrong from AOTInductor, torch 2.13 CPU)
    same = (k_structure[:, None] == graph.structure_index[None, :]).to(
        positions.dtype
    )  # (K, N)
    phases = kvectors @ positions.T  # (K, N)
    cosines, sines = torch.cos(phases) * same, torch.sin(phases) * same
    cos_sum, sin_sum = cosines @ charges, sines @ charges  # (K,)
    return ((kernel_k * cos_sum) @ cosines) + ((kernel_k * sin_sum) @ sines)


def _pme_kspace(
    module: "LongRangeElectrostatics",
    charges: Tensor,
    graph: AtomicGraph,
    periodic: Tensor,
) -> Tensor:
    """(N,) torch-pme's PME sum before 1/V (Lagrange interpolation onto the
    mesh, FFT, kernel, inverse FFT, interpolation back) for the one periodic
    structure of the graph (`export_inputs` gives one per call), whose mesh
    size is the shape of ``graph.properties[MESH]``; other atoms' charges are
    masked out."""
    positions = graph.positions
    mesh = graph.properties[MESH]
    sizes = [mesh.shape[0], mesh.shape[1], mesh.shape[2]]
    weight = periodic.to(positions.dtype)  # (S,): one 1 at most
    # the periodic structure's cell (a unit one when there is none)
    eye = torch.eye(3, dtype=positions.dtype, device=positions.device)
    cell = (weight[:, None, None] * graph.cell).sum(0) + (1.0 - weight.sum()) * eye
    recip = reciprocal_cells(cell.unsqueeze(0))[0][0]
    masked = charges * weight[graph.structure_index]
    # fractional mesh coordinates n_a r·b_a/2π (torch-pme: n (r @ cell⁻¹))
    fractions = positions @ recip.T / (2.0 * math.pi)
    relative = torch.stack([fractions[:, a] * sizes[a] for a in range(3)], dim=1)
    interpolator = module.kspace.mesh_interpolator
    nodes = int(interpolator.interpolation_nodes)
    if nodes % 2 == 0:
        base = torch.floor(relative)
        offsets = relative - (base + 0.5)
    else:
        base = torch.round(relative)
        offsets = relative - base
    base = base.long()
    weights = interpolator._compute_1d_weights(offsets)  # (nodes, N, 3)
    shifts = range(1 - (nodes + 1) // 2, 1 + nodes // 2)
    points = torch.stack(
        [
            torch.stack([(base[:, a] + i) % sizes[a] for a in range(3)], dim=1)
            for i in shifts
        ]
    )  # (nodes, N, 3)
    grid = torch.arange(nodes, device=positions.device)
    sx, sy, sz = [g.flatten() for g in torch.meshgrid(grid, grid, grid, indexing="ij")]
    index = (points[sx, :, 0], points[sy, :, 1], points[sz, :, 2])  # (nodes³, N)
    stencil = weights[sx, :, 0] * weights[sy, :, 1] * weights[sz, :, 2]
    density = torch.zeros(sizes, dtype=positions.dtype, device=positions.device)
    density = density.index_put(index, masked * stencil, accumulate=True)
    # the mesh's k-vectors: fftfreq and rfftfreq times n
    frequencies = []
    for a, size in enumerate(sizes):
        m = torch.arange(
            size // 2 + 1 if a == 2 else size,
            device=positions.device,
            dtype=positions.dtype,
        )
        if a < 2:
            m = torch.where(m < (size + 1) // 2, m, m - size)
        frequencies.append(m)
    kvectors = (
        frequencies[0][:, None, None, None] * recip[0]
        + frequencies[1][None, :, None, None] * recip[1]
        + frequencies[2][None, None, :, None] * recip[2]
    )
    kernel = _kernel_from_k_sq(module, (kvectors * kvectors).sum(-1))
    transformed = torch.fft.rfftn(density, norm="backward")
    potential_mesh = torch.fft.irfftn(transformed * kernel, s=sizes, norm="forward")
    return (potential_mesh[index] * stencil).sum(0)


def _smearing_and_prefactor(module: "LongRangeElectrostatics") -> Tuple[float, float]:
    """The smearing σ (Å) and prefactor k (eV·Å/e²) of the module's potential."""
    potential = module.kspace.potential
    return float(potential.smearing), float(potential.prefactor)


def _kernel_from_k_sq(module: "LongRangeElectrostatics", k_sq: Tensor) -> Tensor:
    """torch-pme's CoulombPotential.lr_from_k_sq, 4π k e^{-σ² k²/2} / k² (0 at
    k = 0), with σ and k as numbers."""
    smearing, prefactor = _smearing_and_prefactor(module)
    masked = torch.where(k_sq == 0, torch.ones_like(k_sq), k_sq)
    kernel = (
        (4.0 * math.pi * prefactor) * torch.exp(-0.5 * smearing**2 * masked) / masked
    )
    return torch.where(k_sq == 0, torch.zeros_like(k_sq), kernel)


def _slab_correction(
    module: "LongRangeElectrostatics",
    charges: Tensor,
    graph: AtomicGraph,
    atom_cells: Tensor,
    volume: Tensor,
) -> Tensor:
    """(N,) torch-pme's 2D (slab) correction per atom of the batch, zero for the
    structures without exactly two periodic directions."""
    structure, positions = graph.structure_index, graph.positions
    num_structures = graph.cell.shape[0]
    slab = graph.pbc.sum(dim=1) == 2  # (S,)
    # one-hot of the non-periodic axis (products, not gathers: the gathers'
    # backward passes miscompiled beside the k-space sum's in AOTInductor)
    axis = (~graph.pbc).to(positions.dtype) * slab.to(positions.dtype)[:, None]
    axis = axis[structure]  # (N, 3)
    z = (positions * axis).sum(-1)  # (N,)
    length_sq = ((atom_cells * atom_cells).sum(-1) * axis).sum(-1)
    total = scatter_sum(charges, structure, num_structures)[structure]
    moment = scatter_sum(charges * z, structure, num_structures)[structure]
    second = scatter_sum(charges * z * z, structure, num_structures)[structure]
    correction = (4.0 * math.pi / volume) * (
        z * moment - 0.5 * (second + total * z * z) - total / 12.0 * length_sq
    )
    prefactor = _smearing_and_prefactor(module)[1]
    return prefactor * torch.where(
        slab[structure], correction, torch.zeros_like(correction)
    )
