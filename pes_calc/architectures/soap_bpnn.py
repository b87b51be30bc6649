"""SOAP-BPNN: SOAP power spectra (torch-spex bases) fed to one network per species.

Hyperparameters and defaults are metatrain's ``soap_bpnn``. For each atom i:

| step | code | shape |
|---|---|---|
| density c_{a,lmn} = Σ_j [t(j)=a] f_c(r_ij) | `_density` | (N, T, 2l+1, n_l) |
| R_nl(r_ij) Y_lm(r̂_ij) | | |
| power spectrum p_l = Σ_m c_{lm·} ⊗ c_{lm·}, | `_power_spectrum` | (N, D) |
| upper triangle over (a, n) | | |
| per-species LayerNorm → MLP (SiLU) → head → features f_i | `network` | (N, W) |
| energy e_i = f̃_i · w, | `last_layer` | (N,) |
| f̃ = f placed in the block of species t(i) | | |

With ``long_range.enable`` (metatrain's hyperparameters and defaults: ``use_ewald``
false → particle-mesh Ewald, ``smearing`` 1.4 Å, ``kspace_resolution`` 1.33 Å,
``interpolation_nodes`` 5), each atom also gets a latent charge and its Coulomb
energy, which enters the readout as one more last-layer feature. pes_calc's own
``charge_transfer_radius`` (default None: neutral per structure) turns the latent
charges into bond charge transfers within that radius, neutral per molecule:

| step | code | shape |
|---|---|---|
| latent charge q̃_i = f̃_i · w_q (e), per species through the blocks | `charges` | (N,) |
| q_i = q̃_i - mean_s q̃, or with transfers Σ_j s(r_ij)(q̃_j - q̃_i) | `long_range` | (N,) |
| E^lr_i = ½ q_i Σ_j q_j v(r_ij) (eV) | `long_range` | (N,) |
| e_i = [f̃_i, E^lr_i] · w, with w's last entry initialised to 1 | `last_layer` | (N,) |

`pes_calc.nn.long_range` documents the kernel v (Coulomb, 14.399645 eV·Å/e², switched
off smoothly inside the SOAP cutoff, which the short-range part describes), the
Ewald / PME / direct sums and the periodicities. Keeping E^lr a feature keeps
e_i = f̃_i · w exact, so LLPR covers the electrostatic term too. The energy of a
structure is then E_sr + w_lr σ Σ_i E^lr_i (σ the potential's energy scale): the
product w_lr σ only rescales the latent charges. w_q starts at N(0, 1/W) (W the
features per species), so q̃ is of order 1 at the start: E^lr is quadratic in q, and
from the default, ~5× smaller, start the gradients that would grow the charges are
that much weaker and training kept them near 0 (models/README.md, issue 7).

R_nl are torch-spex's splined Laplacian eigenstates (trimmed with l), Y_lm its
(sphericart) real spherical harmonics, f_c the shifted-cosine cutoff. The power
spectrum is symmetric in its two (a, n) indices, so only the upper triangle is kept.
"""

import copy
import functools
from typing import Dict, List, Sequence, Tuple

import torch
from spex.angular import SphericalHarmonics
from spex.radial import LaplacianEigenstates
from torch import Tensor, nn

from pes_calc.graph import AtomicGraph, number_of_atoms
from pes_calc.nn.cutoffs import shifted_cosine_cutoff, shifted_cosine_cutoff_slope
from pes_calc.nn.long_range import LongRangeElectrostatics
from pes_calc.nn.mlp import MLP, PerSpecies, species_groups
from pes_calc.nn.neighbor_slots import neighbor_ranks, to_slots
from pes_calc.nn.precision import float64_construction
from pes_calc.nn.splines import first_order, hermite_spline
from pes_calc.potential import Architecture

DEFAULT_HYPERS: dict = {
    "soap": {
        "max_angular": 6,
        "max_radial": 7,
        "cutoff": {"radius": 5.0, "width": 0.5},
    },
    "bpnn": {"num_hidden_layers": 2, "num_neurons_per_layer": 32, "layernorm": True},
    "heads": {"energy": "mlp"},
    # metatrain's λ-SOAP basis for spherical-tensor targets; an energy model (the
    # only target here) never uses it, so either value builds the same model
    "add_lambda_basis": True,
    "zbl": False,
    "long_range": {
        "enable": False,
        "use_ewald": False,
        "smearing": 1.4,
        "kspace_resolution": 1.33,
        "interpolation_nodes": 5,
        # pes_calc's own: None neutralises per structure (metatrain-like); a radius
        # (Å) makes charges bond transfers, neutral per molecule (long_range.py)
        "charge_transfer_radius": None,
        # pes_calc's own: n of the switch 1 - ((1 - cos πr/r_c)/2)^n that removes
        # pairs inside the SOAP cutoff r_c (torch-pme's exclusion_degree)
        "exclusion_degree": 1,
    },
}


@functools.lru_cache(maxsize=8)
def _laplacian_eigenstates(
    cutoff: float, max_angular: int, max_radial: int
) -> LaplacianEigenstates:
    """Build (once per process and hypers: it takes seconds) the splined basis.

    torch-spex stores its spline tables in torch's default dtype: build them in
    float64 so that float64 models get exact tables.
    """
    with float64_construction():
        return LaplacianEigenstates(
            cutoff=cutoff, max_angular=max_angular, max_radial=max_radial
        )


# the cost of one more batched product, in (harmonic, radial) pairs per atom: grouping
# degrees computes unused cross-degree pairs, splitting them costs calls
GROUP_CALL_COST = 500


def degree_groups(n_per_l: Sequence[int]) -> List[Tuple[int, int]]:
    """Consecutive degrees [first, last) per batched density product, fewest pairs
    (Σ (2l+1) × Σ n_l per group, plus `GROUP_CALL_COST` per group) first."""
    num_degrees = len(n_per_l)
    best: List[Tuple[float, List[Tuple[int, int]]]] = [(0.0, [])]
    for last in range(1, num_degrees + 1):
        options = []
        for first in range(last):
            pairs = (last * last - first * first) * sum(n_per_l[first:last])
            cost, groups = best[first]
            options.append((cost + pairs + GROUP_CALL_COST, groups + [(first, last)]))
        best.append(min(options, key=lambda option: option[0]))
    return best[num_degrees][1]


class SoapBpnn(Architecture):
    """SOAP power spectrum + Behler–Parrinello per-species networks."""

    # its density sums over neighbour slots: compiled, it takes their width
    uses_neighbor_slots = True

    def __init__(self, species: Sequence[str], hypers: Dict):
        super().__init__()
        soap, bpnn, heads = hypers["soap"], hypers["bpnn"], hypers["heads"]
        self.num_species = len(species)
        self.cutoff = float(soap["cutoff"]["radius"])
        self.cutoff_width = float(soap["cutoff"]["width"])
        max_angular = int(soap["max_angular"])
        self.radial = copy.deepcopy(
            _laplacian_eigenstates(self.cutoff, max_angular, int(soap["max_radial"]))
        )
        self.angular = SphericalHarmonics(max_angular)
        self.n_per_l: List[int] = [int(n) for n in self.radial.n_per_l]
        # True once prepared for export: formulations for compiled kernels
        self.export_formulation = False

        # degrees whose densities come from one batched product (see _density)
        self.degree_groups: List[Tuple[int, int]] = degree_groups(self.n_per_l)
        # flat upper-triangle indices into each (k_l × k_l) product, k_l = T n_l
        triangles = []
        for n in self.n_per_l:
            k = self.num_species * n
            rows, cols = torch.triu_indices(k, k)
            triangles.append(rows * k + cols)
        self.triangle_sizes: List[int] = [len(t) for t in triangles]
        self.register_buffer("triangles", torch.cat(triangles), persistent=False)
        self.soap_size = sum(self.triangle_sizes)

        width = int(bpnn["num_neurons_per_layer"])
        hidden = [width] * int(bpnn["num_hidden_layers"])
        head = heads.get("energy", "mlp")
        if head not in ("mlp", "linear"):
            raise ValueError(f"heads.energy must be 'mlp' or 'linear', not {head!r}")
        networks = []
        for _ in species:
            layers: List[nn.Module] = []
            if bpnn["layernorm"]:
                layers.append(nn.LayerNorm(self.soap_size))
            layers.append(MLP(self.soap_size, hidden))
            if head == "mlp":  # metatrain's MLP head: one more SiLU layer
                layers.append(MLP(hidden[-1] if hidden else self.soap_size, [width]))
            networks.append(nn.Sequential(*layers))
        self.features_per_species = (
            width if (hidden or head == "mlp") else self.soap_size
        )
        self.network = PerSpecies(networks, self.features_per_species)
        block_width = self.num_species * self.features_per_species
        long_range = hypers["long_range"]
        if long_range["enable"]:
            self.charges = nn.Linear(block_width, 1, bias=False)
            with torch.no_grad():  # latent charges of order 1 (see the docstring)
                self.charges.weight.normal_(0.0, self.features_per_species**-0.5)
            self.long_range = LongRangeElectrostatics(
                smearing=float(long_range["smearing"]),
                kspace_resolution=float(long_range["kspace_resolution"]),
                interpolation_nodes=int(long_range["interpolation_nodes"]),
                use_ewald=bool(long_range["use_ewald"]),
                exclusion_radius=self.cutoff,
                charge_transfer_radius=long_range["charge_transfer_radius"],
                exclusion_degree=int(long_range["exclusion_degree"]),
            )
            self.last_layer = nn.Linear(block_width + 1, 1, bias=False)
            with torch.no_grad():  # start from the plain Coulomb energy of q
                self.last_layer.weight[0, -1] = 1.0
        else:
            self.charges = None
            self.long_range = None
            self.last_layer = nn.Linear(block_width, 1, bias=False)

    def forward(self, graph: AtomicGraph, vectors: Tensor) -> Tuple[Tensor, Tensor]:
        """Raw per-atom energies (N,) and last-layer features (N, T·W), with the
        per-atom Coulomb energy as one more column (N, T·W + 1) with long range."""
        block_features = self._block_features(graph, vectors)
        if self.charges is not None and self.long_range is not None:
            lengths = torch.linalg.vector_norm(vectors, dim=-1)
            charges = self.charges(block_features).squeeze(-1)
            coulomb = self.long_range(charges, graph, lengths)
            block_features = torch.cat([block_features, coulomb.unsqueeze(-1)], dim=1)
        return self.last_layer(block_features).squeeze(-1), block_features

    def latent_charges(self, graph: AtomicGraph, vectors: Tensor) -> Tensor:
        """(N,) neutral charges (e) of a long-range model, as its Coulomb sum uses
        them (before the readout weight of the Coulomb feature)."""
        charges, long_range = self.charges, self.long_range
        if charges is None or long_range is None:
            raise ValueError("this SOAP-BPNN has no long-range part")
        block_features = self._block_features(graph, vectors)
        lengths = torch.linalg.vector_norm(vectors, dim=-1)
        return long_range.charges(charges(block_features).squeeze(-1), graph, lengths)

    def _block_features(self, graph: AtomicGraph, vectors: Tensor) -> Tensor:
        """(N, T·W) network features f̃, placed in the block of each atom's species."""
        soap = self._power_spectrum(self._density(graph, vectors))
        groups = species_groups(graph.species, self.num_species)
        features = self.network(soap, groups)  # (N, W)
        one_hot = nn.functional.one_hot(graph.species, self.num_species).to(
            features.dtype
        )
        return (one_hot.unsqueeze(-1) * features.unsqueeze(1)).flatten(1)

    def _density(self, graph: AtomicGraph, vectors: Tensor) -> List[Tensor]:
        """Neighbor densities per l, each (N, 2l+1, T·n_l).

        Σ_j y_lm(j) r_an(j) for every (lm, an) is a batched product over each atom's
        neighbour slots (`pes_calc.nn.neighbor_slots`): the edge vectors are laid out
        as (N, K, 3) first, so the bases and their gradients are computed, and come
        back from the products, in that one contiguous layout (no per-edge
        (E, Σ (2l+1) n_l) products, no scatter, no gathers along the basis axis).
        """
        i, j = graph.edge_index[0], graph.edge_index[1]
        num_atoms = number_of_atoms(graph)
        ranks, width = neighbor_ranks(i, num_atoms, graph.properties)
        # empty slots hold a vector beyond the cutoff: radial factors and their
        # gradients vanish there, and the harmonics stay finite
        empty = vectors.new_zeros(num_atoms, width, 3)
        empty[:, :, 2] = 2.0 * self.cutoff
        slot_vectors = empty.index_put((i, ranks), vectors).view(-1, 3)
        lengths = torch.linalg.vector_norm(slot_vectors, dim=-1)  # (N·K,)
        radial = self._radial(lengths)  # (N·K, Σ n_l)
        harmonics = self.angular.sph.compute(slot_vectors)  # (N·K, (l_max+1)²)
        if self.num_species > 1:  # neighbour j's radial factors in its species' block
            neighbor_species = to_slots(graph.species[j], i, ranks, num_atoms, width)
            radial = radial.unsqueeze(1) * nn.functional.one_hot(
                neighbor_species.view(-1), self.num_species
            ).to(radial.dtype).unsqueeze(-1)  # (N·K, T, Σ n_l)
        padded_harmonics = harmonics.view(num_atoms, width, -1)
        padded_radial = radial.view(num_atoms, width, self.num_species, -1)
        densities: List[Tensor] = []
        for first, last in self.degree_groups:
            # (N, T, Σ n_l, Σ 2l+1) over the group's degrees; only equal l is kept.
            # Radial factors second: their gradient comes out in their own layout
            # (measured: 12 against 14 ms at 256 Cu atoms compiled, 1 thread)
            start, stop = sum(self.n_per_l[:first]), sum(self.n_per_l[:last])
            radial_block = padded_radial[:, :, :, start:stop].reshape(
                num_atoms, width, -1
            )
            harmonics_block = padded_harmonics[:, :, first * first : last * last]
            product = torch.bmm(harmonics_block.transpose(1, 2), radial_block)
            product = product.transpose(1, 2).view(
                num_atoms, self.num_species, stop - start, -1
            )
            row, column = 0, 0
            for l in range(first, last):
                n = self.n_per_l[l]
                block = product[:, :, column : column + n, row : row + 2 * l + 1]
                # (N, 2l+1, T·n_l), species-major columns
                densities.append(
                    block.permute(0, 3, 1, 2).reshape(num_atoms, 2 * l + 1, -1)
                )
                row, column = row + 2 * l + 1, column + n
        return densities

    def _radial(self, lengths: Tensor) -> Tensor:
        """(E, Σ n_l) torch-spex's flat radial basis (before its modules split it per
        l) times the cutoff function; first order once prepared for export."""
        cutoff = shifted_cosine_cutoff(lengths, self.cutoff, self.cutoff_width)
        spliner = self.radial.spliner
        if not self.export_formulation:
            return spliner(lengths) * cutoff.unsqueeze(-1)
        value, slope = hermite_spline(
            lengths,
            spliner.spline_spacing,
            spliner.spline_values,
            spliner.spline_derivatives,
            self.cutoff,
        )
        cutoff_slope = shifted_cosine_cutoff_slope(
            lengths, self.cutoff, self.cutoff_width
        )
        return first_order(
            value * cutoff.unsqueeze(-1),
            slope * cutoff.unsqueeze(-1) + value * cutoff_slope.unsqueeze(-1),
            lengths,
        )

    def prepare_for_export(self) -> None:
        """The radial basis in first order (a compiled graph's backward pass then
        reads one (E, Σ n_l) derivative instead of autograd's saved spline terms) and
        the power spectrum as broadcast products (fused kernels instead of one tiny
        batched matrix product per degree, forward and backward)."""
        self.export_formulation = True

    def _power_spectrum(self, densities: List[Tensor]) -> Tensor:
        """(N, D) rotation-invariant products Σ_m c_{lmk} c_{lmk'} for k ≤ k'."""
        triangles = torch.split(self.triangles, self.triangle_sizes)
        blocks: List[Tensor] = []
        for density, triangle in zip(densities, triangles):
            if self.export_formulation:
                product = (density.unsqueeze(3) * density.unsqueeze(2)).sum(1)
            else:
                product = torch.einsum("imk,imq->ikq", density, density)
            product = product.flatten(1)
            blocks.append(product.index_select(1, triangle))
        return torch.cat(blocks, dim=1)
