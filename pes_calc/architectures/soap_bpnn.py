"""SOAP-BPNN: SOAP power spectra (torch-spex bases) fed to one network per species.

Hyperparameters and defaults are metatrain's ``soap_bpnn``. For each atom i:

| step | code | shape |
|---|---|---|
| density c_{a,lmn} = Σ_j [t(j)=a] f_c(r_ij) R_nl(r_ij) Y_lm(r̂_ij) | `_density` | (N, T, 2l+1, n_l) |
| power spectrum p_l = Σ_m c_{lm·} ⊗ c_{lm·}, upper triangle over (a, n) | `_power_spectrum` | (N, D) |
| per-species LayerNorm → MLP (SiLU) → head → features f_i | `network` | (N, W) |
| energy e_i = f̃_i · w, f̃ = f placed in the block of species t(i) | `last_layer` | (N,) |

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

from pes_calc.build import float64_default
from pes_calc.graph import AtomicGraph, number_of_atoms
from pes_calc.nn.cutoffs import shifted_cosine_cutoff
from pes_calc.nn.mlp import MLP, PerSpecies, species_groups
from pes_calc.nn.scatter import scatter_sum
from pes_calc.potential import Architecture

DEFAULT_HYPERS: dict = {
    "soap": {"max_angular": 6, "max_radial": 7, "cutoff": {"radius": 5.0, "width": 0.5}},
    "bpnn": {"num_hidden_layers": 2, "num_neurons_per_layer": 32, "layernorm": True},
    "heads": {"energy": "mlp"},
    "zbl": False,
    "long_range": {
        "enable": False,
        "use_ewald": False,
        "smearing": 1.4,
        "kspace_resolution": 1.33,
        "interpolation_nodes": 5,
    },
}


@functools.lru_cache(maxsize=8)
def _laplacian_eigenstates(
    cutoff: float, max_angular: int, max_radial: int
) -> LaplacianEigenstates:
    """Build (once per process and hypers: it takes seconds) the splined basis.

    torch-spex stores its spline tables in the default dtype; build them in float64
    so that float64 models get exact tables, restoring the caller's default after.
    """
    with float64_default():
        return LaplacianEigenstates(
            cutoff=cutoff, max_angular=max_angular, max_radial=max_radial
        )


class SoapBpnn(Architecture):
    """SOAP power spectrum + Behler–Parrinello per-species networks."""

    def __init__(self, species: Sequence[str], hypers: Dict):
        super().__init__()
        if hypers["long_range"]["enable"]:
            raise NotImplementedError(
                "long_range is not yet supported by pes_calc's SOAP-BPNN; "
                "set long_range.enable to false"
            )
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

        # per l: width k_l = T n_l of the density, and its upper-triangle indices
        self.density_sizes: List[int] = [
            (2 * l + 1) * n for l, n in enumerate(self.n_per_l)
        ]
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
        self.features_per_species = width if (hidden or head == "mlp") else self.soap_size
        self.network = PerSpecies(networks, self.features_per_species)
        self.last_layer = nn.Linear(
            self.num_species * self.features_per_species, 1, bias=False
        )

    def forward(self, graph: AtomicGraph, vectors: Tensor) -> Tuple[Tensor, Tensor]:
        """Raw per-atom energies (N,) and block last-layer features (N, T·W)."""
        soap = self._power_spectrum(self._density(graph, vectors))
        groups = species_groups(graph.species, self.num_species)
        features = self.network(soap, groups)  # (N, W)
        one_hot = nn.functional.one_hot(graph.species, self.num_species).to(
            features.dtype
        )
        block_features = (one_hot.unsqueeze(-1) * features.unsqueeze(1)).flatten(1)
        return self.last_layer(block_features).squeeze(-1), block_features

    def _density(self, graph: AtomicGraph, vectors: Tensor) -> List[Tensor]:
        """Neighbour densities per l, each (N, 2l+1, T·n_l)."""
        i, j = graph.edge_index[0], graph.edge_index[1]
        lengths = torch.linalg.vector_norm(vectors, dim=-1)  # (E,)
        cutoff = shifted_cosine_cutoff(lengths, self.cutoff, self.cutoff_width)
        radial = self.radial(lengths)  # list over l of (E, n_l)
        harmonics = self.angular(vectors)  # list over l of (E, 2l+1)
        # all (l, m, n) products in one tensor so that one scatter serves every l
        products = torch.cat(
            [
                (y.unsqueeze(-1) * (r * cutoff.unsqueeze(-1)).unsqueeze(1)).flatten(1)
                for y, r in zip(harmonics, radial)
            ],
            dim=1,
        )  # (E, Σ (2l+1) n_l)
        num_atoms = number_of_atoms(graph)
        slot = i * self.num_species + graph.species[j]  # (centre, neighbour species)
        density = scatter_sum(products, slot, num_atoms * self.num_species)
        densities: List[Tensor] = []
        for l, block in enumerate(torch.split(density, self.density_sizes, dim=1)):
            n = self.n_per_l[l]
            block = block.reshape(num_atoms, self.num_species, 2 * l + 1, n)
            densities.append(
                block.permute(0, 2, 1, 3).reshape(num_atoms, 2 * l + 1, -1)
            )
        return densities

    def _power_spectrum(self, densities: List[Tensor]) -> Tensor:
        """(N, D) rotation-invariant products Σ_m c_{lmk} c_{lmk'} for k ≤ k'."""
        triangles = torch.split(self.triangles, self.triangle_sizes)
        blocks: List[Tensor] = []
        for density, triangle in zip(densities, triangles):
            product = torch.einsum("imk,imq->ikq", density, density).flatten(1)
            blocks.append(product.index_select(1, triangle))
        return torch.cat(blocks, dim=1)

