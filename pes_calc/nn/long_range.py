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
values, so after `prepare_for_export` the module sums with the cell-dependent
integer data that `export_inputs` computes outside the graph
(`pes_calc.nn.long_range_export`, which explains it; re-exported here).
"""

from typing import Dict, List, Optional, Union

import torch
from torch import Tensor, nn
from torchpme import CoulombPotential, EwaldCalculator, PMECalculator
from torchpme.prefactors import eV_A

from pes_calc.graph import AtomicGraph, atoms_per_structure, number_of_structures
from pes_calc.nn.cutoffs import shifted_cosine_cutoff
from pes_calc.nn.long_range_cells import check_periodic_cell
from pes_calc.nn.long_range_export import (
    DIRECT_MASK,
    DIRECT_PAIRS,
    EWALD_INPUTS,
    KVECTOR_STRUCTURE,
    KVECTORS,
    MESH,
    PME_INPUTS,
    export_input_names,
    export_inputs,
    exported_energies,
)
from pes_calc.nn.scatter import scatter_sum

__all__ = [
    "COULOMB_CONSTANT",
    "DIRECT_MASK",
    "DIRECT_PAIRS",
    "EWALD_INPUTS",
    "KVECTORS",
    "KVECTOR_STRUCTURE",
    "LongRangeElectrostatics",
    "MESH",
    "PME_INPUTS",
    "TRANSFER_WIDTH",
    "export_input_names",
    "export_inputs",
    "neutralise",
    "transfer_charges",
]

COULOMB_CONSTANT = float(eV_A)  # e²/(4πε₀) in eV·Å
TRANSFER_WIDTH = 0.5  # Å, the width of the charge-transfer switch s


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
            check_periodic_cell(cell, periodic)
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
        """`forward` after `prepare_for_export`: `exported_energies` (eV)."""
        return exported_energies(self, charges, graph, lengths)

    @torch.jit.unused
    def _detach_mesh_state(self) -> None:
        """PME keeps its last cell, k-space filter and interpolation weights as plain
        attributes; detach them, or deep-copying the model after a forward pass with
        gradients (the trainer, `compile_model`) fails on non-leaf tensors."""
        for module in self.kspace.modules():
            for name, value in list(vars(module).items()):
                if isinstance(value, Tensor) and value.requires_grad:
                    setattr(module, name, value.detach())
