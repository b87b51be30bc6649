"""Long-range electrostatics of per-atom latent charges, summed with torch-pme.

An architecture predicts one latent value q̃_i per atom; this module turns it into
neutral charges (per structure, or per molecule with charge transfer) and returns
per-atom electrostatic energies:

| quantity | code | formula |
|---|---|---|
| charges (e), per structure | `neutralise` | q_i = q̃_i - (1/n_s) Σ_{j in s} q̃_j |
| charges (e), bond transfers | `transfer_charges` | q_i = Σ_j s(r_ij) (q̃_j - q̃_i) |
| transfer switch | `transfer_charges` | s: shifted cosine, 1 below r_t - w, 0 at r_t |
| pair kernel (eV/e²) | `pair_kernel` | v(r) = k erf(r/√2σ)/r · (1 - f_x(r)) |
| exclusion switch | `f_cutoff` | f_x = 1 - ((1 - cos πr/r_x)/2)^n for r < r_x, else 0 |
| per-atom energy (eV) | `forward` | E_i = ½ q_i Σ_{j, images} q_j v(r_ij) |

Units: Å, e, eV; k = torchpme.prefactors.eV_A = 14.399645 eV·Å/e².

- **Periodic** structures (3 periodic directions) use torch-pme's Ewald sum
  (``use_ewald``) or particle-mesh Ewald with Lagrange interpolation on
  ``interpolation_nodes`` points per axis. ``kspace_resolution`` (Å) is Ewald's
  shortest wavelength and PME's mesh spacing; ``smearing`` σ (Å) splits the Coulomb
  law into k-space and real-space parts.
- **Slabs** (exactly 2 periodic directions) add torch-pme's 2D correction
  (Yeh–Berkowitz, 2π M_z²/V for a neutral cell). It needs a cell vector along the
  non-periodic axis, aligned with that Cartesian axis and perpendicular to the two
  periodic vectors, with a vacuum gap: anything else raises ``ValueError``, as does
  one periodic direction (wires).
- **Non-periodic** structures sum v(r) over all pairs directly (O(n²)).

**Exclusion radius.** With ``exclusion_radius`` r_x (the SOAP cutoff in SOAP-BPNN)
pairs closer than r_x are switched off smoothly, since the short-range model
describes them (torch-pme's switch; ``exclusion_degree`` n = 1 by default; a larger
n keeps the switch closed further out: n = 4 leaves 0.2% of the Coulomb law at
0.3 r_x, 6% at r_x/2 and 67% at 0.8 r_x, so bonded pairs inside a molecule hardly
interact), and the real-space part is only the -f_x erf/r correction over the graph
edges, which the switch takes to zero with its slope at r_x: edges beyond r_x
(a Verlet skin) add nothing. Beyond r_x the kernel is the Coulomb law up to
erfc(r/√2σ) (< 4e-4 at r ≥ 5 Å for σ = 1.4 Å). The direct sum uses the same kernel,
so a molecule in a large box and in vacuum agree. Without an exclusion radius the
kernel is the bare Coulomb law and the real-space sum runs over the graph edges
(erfc(r/√2σ)/r, so the graph cutoff must be several σ).

**Neutrality.** Latent charges are not physical charges and the model is not told a
total charge, so every structure is made neutral. The Ewald sum of a charged cell
would depend on the smearing through its background term, and periodic and vacuum
energies of the same molecule could not agree. Two ways:

- ``charge_transfer_radius`` ``None`` (metatrain-like default): the mean latent
  charge of each structure is subtracted. Two molecules far apart can then carry
  opposite net charges (the sum of q̃ over each one need not vanish), whose 1/r
  monopole tail is spurious for neutral molecules.
- ``charge_transfer_radius`` r_t (Å): q̃ acts as an electronegativity and charge
  flows along every graph edge closer than r_t, q_i = Σ_j s(r_ij)(q̃_j - q̃_i)
  (bond charge increments). Each edge moves charge from one atom to another, so
  every set of atoms with no edge shorter than r_t to the rest (a molecule, a
  structure) is exactly neutral, with no fragment search; s goes smoothly to zero
  at r_t (width ``TRANSFER_WIDTH``, or r_t/2 if smaller), so charges and energies
  stay continuous when molecules meet or part. r_t should exceed the bond lengths
  and stay below intermolecular contacts (1.5-2.5 Å for organic molecules). A lone
  atom gets no charge.

Edges are the graph's full list (both i→j and j→i), which torch-pme takes with
``full_neighbor_list=True``. Forces and stress come from autograd through positions
and the (strained) cell, including the k-vectors and the volume.

**AOTInductor.** An exported graph cannot hold shapes that depend on the cell's
values (Ewald's k-vector count, PME's mesh, the direct sum's pairs), so
`export_inputs` computes that integer data outside the graph, and after
`prepare_for_export` the module reads it from ``graph.properties``: Ewald's integer
indices n with k = 2π n (cell⁻¹)ᵀ from the strained cell (any batch, summed densely
over the batch's (k, atom) pairs, masked to each structure), PME's mesh as the shape
of an input (one periodic structure per call), the direct-sum pairs, and torch-pme's
self, background and slab terms, batched. Its numbers are torch-pme's
(tests/test_compile_long_range.py).
"""

import math
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torchpme import CoulombPotential, EwaldCalculator, PMECalculator
from torchpme.lib.kvectors import get_ns_mesh
from torchpme.prefactors import eV_A

from pes_calc.graph import AtomicGraph, atoms_per_structure, number_of_structures
from pes_calc.nn.cutoffs import shifted_cosine_cutoff
from pes_calc.nn.scatter import scatter_sum

COULOMB_CONSTANT = float(eV_A)  # e²/(4πε₀) in eV·Å
TRANSFER_WIDTH = 0.5  # Å, the width of the charge-transfer switch s

# the cell-dependent integer data of an exported (AOTInductor) model, computed
# outside its graph by `export_inputs` and passed in ``graph.properties``
KVECTORS = "long_range_kvectors"  # (K, 3) float: integer reciprocal indices n
KVECTOR_STRUCTURE = "long_range_kvector_structure"  # (K,) int64: n's structure
DIRECT_PAIRS = "long_range_direct_pairs"  # (2, D) int64: pairs, non-periodic
DIRECT_MASK = "long_range_direct_mask"  # (D,) float: 1, or 0 for the padding pair
MESH = "long_range_mesh"  # (n_x, n_y, n_z), values unused: PME's mesh, as a shape
EWALD_INPUTS = (KVECTORS, KVECTOR_STRUCTURE, DIRECT_PAIRS, DIRECT_MASK)
PME_INPUTS = (MESH, DIRECT_PAIRS, DIRECT_MASK)


def neutralise(charges: Tensor, graph: AtomicGraph) -> Tensor:
    """(N,) charges minus the mean charge of each atom's structure."""
    num_structures = number_of_structures(graph)
    # a scatter, not bincount, whose data-dependent size export cannot bound
    ones = torch.ones_like(charges)
    counts = scatter_sum(ones, graph.structure_index, num_structures).clamp(min=1)
    means = scatter_sum(charges, graph.structure_index, num_structures) / counts
    return charges - means[graph.structure_index]


def transfer_charges(
    latent: Tensor,
    graph: AtomicGraph,
    lengths: Tensor,
    radius: float,
    width: float = TRANSFER_WIDTH,
) -> Tensor:
    """(N,) charges q_i = Σ_j s(r_ij) (q̃_j - q̃_i) over the graph's (full) edges,
    with s the shifted-cosine switch of ``radius`` (Å) and ``width`` (at most half
    the radius): neutral per fragment."""
    width = min(width, 0.5 * radius)
    switch = shifted_cosine_cutoff(lengths, radius, width)
    i, j = graph.edge_index[0], graph.edge_index[1]
    return scatter_sum(switch * (latent[j] - latent[i]), i, latent.shape[0])


class LongRangeElectrostatics(nn.Module):
    """Per-atom Coulomb energies (eV) of neutralised latent charges (e).

    Parameters are metatrain's ``long_range`` hyperparameters (Å) plus the
    exclusion radius (Å, ``None`` for the bare Coulomb law) and the charge-transfer
    radius (Å, ``None`` to neutralise per structure; see the module docstring).
    """

    def __init__(
        self,
        smearing: float = 1.4,
        kspace_resolution: float = 1.33,
        interpolation_nodes: int = 5,
        use_ewald: bool = False,
        exclusion_radius: Optional[float] = None,
        charge_transfer_radius: Optional[float] = None,
        exclusion_degree: int = 1,
    ):
        super().__init__()
        if smearing <= 0 or kspace_resolution <= 0:
            raise ValueError(
                "long_range smearing and kspace_resolution must be positive"
            )
        if charge_transfer_radius is not None and charge_transfer_radius <= 0:
            raise ValueError("long_range charge_transfer_radius must be positive")
        self.transfers = charge_transfer_radius is not None
        self.transfer_radius = (
            float(charge_transfer_radius) if charge_transfer_radius is not None else 0.0
        )
        self.transfer_width = TRANSFER_WIDTH
        if exclusion_radius is not None:
            exclusion_radius = float(exclusion_radius)
        if int(exclusion_degree) < 1:
            raise ValueError("long_range exclusion_degree must be a positive integer")
        potential = CoulombPotential(
            smearing=float(smearing),
            exclusion_radius=exclusion_radius,
            exclusion_degree=int(exclusion_degree),
            prefactor=COULOMB_CONSTANT,
        )
        self.use_ewald = bool(use_ewald)
        self.excluded = exclusion_radius is not None
        self.kspace_resolution = float(kspace_resolution)
        # set by `prepare_for_export`: sum Ewald from `export_inputs`' data
        self.precomputed = False
        if self.use_ewald:
            self.kspace = EwaldCalculator(
                potential,
                lr_wavelength=float(kspace_resolution),
                full_neighbor_list=True,
            )
        else:
            if int(interpolation_nodes) not in (3, 4, 5, 6, 7):
                raise ValueError(
                    "long_range interpolation_nodes must be 3 to 7 for PME"
                )
            self.kspace = PMECalculator(
                potential,
                mesh_spacing=float(kspace_resolution),
                interpolation_nodes=int(interpolation_nodes),
                full_neighbor_list=True,
            )
        # torch-pme's buffers (smearing, prefactor) are hyperparameters, rebuilt from
        # the config, and PME registers its potential twice: keep them out of the
        # state dict, which safetensors could not store with shared tensors
        for module in self.kspace.modules():
            module._non_persistent_buffers_set.update(module._buffers.keys())

    def charges(self, latent: Tensor, graph: AtomicGraph, lengths: Tensor) -> Tensor:
        """(N,) neutral charges (e) from latent values (N,) and edge lengths (E,)."""
        if self.transfers:
            return transfer_charges(
                latent, graph, lengths, self.transfer_radius, self.transfer_width
            )
        return neutralise(latent, graph)

    def forward(self, charges: Tensor, graph: AtomicGraph, lengths: Tensor) -> Tensor:
        """(N,) energies E_i from latent charges (N,) and the edge lengths (E,)."""
        charges = self.charges(charges, graph, lengths)
        if not torch.jit.is_scripting() and self.precomputed:
            return self._precomputed_energies(charges, graph, lengths)
        counts: List[int] = atoms_per_structure(graph).tolist()
        periodic_structures: List[bool] = graph.pbc.any(dim=1).tolist()
        # every pair within each non-periodic structure, summed in one pass
        device = charges.device
        pairs: List[Tensor] = [torch.zeros((2, 0), dtype=torch.long, device=device)]
        start = 0
        for s, count in enumerate(counts):
            if not periodic_structures[s]:
                pairs.append(torch.triu_indices(count, count, 1, device=device) + start)
            start += count
        direct = self._direct(charges, graph.positions, torch.cat(pairs, dim=1))
        if not any(periodic_structures):
            return direct

        edge_structure = graph.structure_index[graph.edge_index[0]]
        energies: List[Tensor] = []
        start = 0
        for s, count in enumerate(counts):
            if not periodic_structures[s]:
                energies.append(direct[start : start + count])
                start += count
                continue
            q = charges[start : start + count]
            cell, periodic = graph.cell[s], graph.pbc[s]
            _check_periodic_cell(cell, periodic)
            mask = edge_structure == s
            # torch-pme returns V_i = ½ Σ_j q_j v(r_ij), so E_i = q_i V_i
            potential = self.kspace(
                charges=q.unsqueeze(-1),
                cell=cell,
                positions=graph.positions[start : start + count],
                neighbor_indices=(graph.edge_index[:, mask] - start).T,
                neighbor_distances=lengths[mask],
                periodic=periodic,
            )
            energies.append(q * potential.squeeze(-1))
            start += count
        if not torch.jit.is_scripting():
            self._detach_mesh_state()
        return torch.cat(energies)

    def pair_kernel(self, distances: Tensor) -> Tensor:
        """v(r) in eV/e² for the direct sum; Ewald and PME sum it over images."""
        potential = self.kspace.potential
        if self.excluded:
            return potential.lr_from_dist(distances) * (
                1.0 - potential.f_cutoff(distances)
            )
        return potential.from_dist(distances)

    def _direct(self, charges: Tensor, positions: Tensor, pairs: Tensor) -> Tensor:
        """(N,) energies from summing v over ``pairs`` (2, P), each pair once."""
        i, j = pairs[0], pairs[1]
        distances = torch.linalg.vector_norm(positions[j] - positions[i], dim=-1)
        kernel = self.pair_kernel(distances)
        count = positions.shape[0]
        field = scatter_sum(charges[j] * kernel, i, count) + scatter_sum(
            charges[i] * kernel, j, count
        )
        return 0.5 * charges * field

    def prepare_for_export(self) -> None:
        """Sum with `export_inputs`' k-vectors, mesh and pairs (graph.properties),
        the compiled graph's formulation: `compile_model` calls this on its copy."""
        self.precomputed = True

    def export_spec(self) -> Dict[str, Union[str, float]]:
        """What `export_inputs` needs (a compiled package's metadata)."""
        if self.use_ewald:
            return {"method": "ewald", "kspace_resolution": self.kspace_resolution}
        return {"method": "pme", "kspace_resolution": self.kspace_resolution}

    @torch.jit.unused
    def _precomputed_energies(
        self, charges: Tensor, graph: AtomicGraph, lengths: Tensor
    ) -> Tensor:
        """`forward`'s energies from neutral ``charges`` for a batch of any
        structures at once, with the cell-dependent integer data (k-vector indices,
        pairs) from ``graph.properties`` (`export_inputs`): torch-pme's Ewald sum
        (the same k-vectors, kernel, self, background and slab terms) and the direct
        sum, with no shape that depends on the cell's values, so that one exported
        graph serves every cell. k = 2π n (cell⁻¹)ᵀ from the (strained) cell keeps
        forces and stress exact."""
        inputs = graph.properties
        potential = self.kspace.potential
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
        kernel = self.pair_kernel(distances) * mask
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
        _, atom_volumes = _reciprocal_cells(atom_cells)
        volume = torch.abs(atom_volumes)  # (N,)
        if self.use_ewald:
            kspace = self._ewald_kspace(charges, graph, periodic)
        else:
            kspace = self._pme_kspace(charges, graph, periodic)
        inverse_volume = 1.0 / volume
        total = scatter_sum(charges, structure, num_structures)[structure]
        # torch-pme's self and background terms, as numbers (inductor cannot lower
        # powers of its 0-d buffers, which tracing makes constants)
        smearing, prefactor = self._smearing_and_prefactor()
        self_term = prefactor * math.sqrt(2.0 / math.pi) / smearing
        background = prefactor * math.pi * smearing**2
        reciprocal_potential = (
            kspace * inverse_volume
            - charges * self_term
            - 2.0 * background * total * inverse_volume
            + self._slab_correction(charges, graph, atom_cells, volume)
        )
        coulomb = charges * (real + 0.5 * reciprocal_potential)
        return direct + periodic_atoms * coulomb

    @torch.jit.unused
    def _ewald_kspace(
        self, charges: Tensor, graph: AtomicGraph, periodic: Tensor
    ) -> Tensor:
        """(N,) Σ_k G(k) Re[e^{-ik·r_i} Σ_j q_j e^{ik·r_j}] over each periodic
        structure's k-vectors (torch-pme's Ewald sum before 1/V)."""
        inputs, positions = graph.properties, graph.positions
        n, k_structure = inputs[KVECTORS], inputs[KVECTOR_STRUCTURE]
        eye = torch.eye(3, dtype=positions.dtype, device=positions.device)
        k_cells = torch.where(
            periodic[k_structure][:, None, None], graph.cell[k_structure], eye
        )
        reciprocal, _ = _reciprocal_cells(k_cells)  # (K, 3, 3)
        kvectors = torch.bmm(n.unsqueeze(1), reciprocal).squeeze(1)
        kernel_k = self._kernel_from_k_sq((kvectors * kvectors).sum(-1))  # (K,)
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

    @torch.jit.unused
    def _pme_kspace(
        self, charges: Tensor, graph: AtomicGraph, periodic: Tensor
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
        recip = _reciprocal_cells(cell.unsqueeze(0))[0][0]
        masked = charges * weight[graph.structure_index]
        # fractional mesh coordinates n_a r·b_a/2π (torch-pme: n (r @ cell⁻¹))
        fractions = positions @ recip.T / (2.0 * math.pi)
        relative = torch.stack([fractions[:, a] * sizes[a] for a in range(3)], dim=1)
        interpolator = self.kspace.mesh_interpolator
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
        sx, sy, sz = [
            g.flatten() for g in torch.meshgrid(grid, grid, grid, indexing="ij")
        ]
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
        kernel = self._kernel_from_k_sq((kvectors * kvectors).sum(-1))
        transformed = torch.fft.rfftn(density, norm="backward")
        potential_mesh = torch.fft.irfftn(transformed * kernel, s=sizes, norm="forward")
        return (potential_mesh[index] * stencil).sum(0)

    @torch.jit.unused
    def _smearing_and_prefactor(self) -> tuple:
        potential = self.kspace.potential
        return float(potential.smearing), float(potential.prefactor)

    @torch.jit.unused
    def _kernel_from_k_sq(self, k_sq: Tensor) -> Tensor:
        """torch-pme's CoulombPotential.lr_from_k_sq, 4π k e^{-σ² k²/2} / k² (0 at
        k = 0), with σ and k as numbers."""
        smearing, prefactor = self._smearing_and_prefactor()
        masked = torch.where(k_sq == 0, torch.ones_like(k_sq), k_sq)
        kernel = (
            (4.0 * math.pi * prefactor)
            * torch.exp(-0.5 * smearing**2 * masked)
            / masked
        )
        return torch.where(k_sq == 0, torch.zeros_like(k_sq), kernel)

    @torch.jit.unused
    def _slab_correction(
        self, charges: Tensor, graph: AtomicGraph, atom_cells: Tensor, volume: Tensor
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
        prefactor = self._smearing_and_prefactor()[1]
        return prefactor * torch.where(
            slab[structure], correction, torch.zeros_like(correction)
        )

    @torch.jit.unused
    def _detach_mesh_state(self) -> None:
        """PME keeps its last cell, k-space filter and interpolation weights as plain
        attributes; detach them, or deep-copying the model after a forward pass with
        gradients (the trainer, `compile_model`) fails on non-leaf tensors."""
        for module in self.kspace.modules():
            for name, value in list(vars(module).items()):
                if isinstance(value, Tensor) and value.requires_grad:
                    setattr(module, name, value.detach())


def _reciprocal_cells(cells: Tensor) -> Tuple[Tensor, Tensor]:
    """(..., 3, 3) reciprocal cells 2π (cell⁻¹)ᵀ, rows b_i = 2π (a_j × a_k) /
    (a_i · (a_j × a_k)), and the (...,) signed volumes, of row-vector cells."""
    a, b, c = cells[..., 0, :], cells[..., 1, :], cells[..., 2, :]
    crosses = torch.stack(
        [torch.linalg.cross(b, c), torch.linalg.cross(c, a), torch.linalg.cross(a, b)],
        dim=-2,
    )
    volumes = (a * crosses[..., 0, :]).sum(-1)
    return (2.0 * math.pi) * crosses / volumes[..., None, None], volumes


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
        _check_periodic_cell(cell, graph.pbc[s])
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


def _check_periodic_cell(cell: Tensor, periodic: Tensor) -> None:
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
