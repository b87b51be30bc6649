"""NequIP: E(3)-equivariant message passing with e3nn tensor products (Batzner et al.).

Hyperparameter names and defaults are nequip's (``NequIPGNNModel``). Per layer k:

| step | code | formula |
|---|---|---|
| radial weights | `Interaction.radial` | w_ij = MLP(b(r_ij / r_c) u(r_ij / r_c)) |
| messages | `Interaction.convolution` | m_ij = (W₁ h_j) ⊗_{w_ij} Y(r̂_ij), paths 'uvu' |
| aggregation | `Interaction.convolution` | a_i = Σ_j m_ij / √(avg_num_neighbors[t_i]) |
| update | `Interaction.forward` | h_i ← Gate(W₂ a_i + SC(h_i, onehot(t_i))) |

h⁰ is a linear embedding of the one-hot species; the last layer keeps only scalars,
which a readout MLP (its last layer linear, bias-free) turns into per-atom energies.

Initialisation preserves variance, as in nequip: the radial and readout MLPs and the
linear layers have weights of standard deviation 1/√fan_in and unit-second-moment
activations (`pes_calc.nn.mlp`), the type embedding unit-variance weights (one weight
per species and feature, as nequip's ``nn.Embedding``), and e3nn's linears, tensor
products and gates are normalised. The radial MLPs' first layers are scaled by
`RADIAL_INPUT_SCALE` to start from nequip's radial weights (see `Interaction`), so the
untrained model's node features stay O(0.1-1) through the layers, given an
avg_num_neighbors near the actual mean neighbor count.
"""

from typing import Dict, List, Sequence, Tuple

import torch
from e3nn import o3
from e3nn.nn import Gate
from torch import Tensor, nn

from pes_calc.graph import AtomicGraph
from pes_calc.nn.cutoffs import polynomial_envelope
from pes_calc.nn.mlp import MLP, normalized_init_, readout
from pes_calc.nn.radial import RADIAL_INPUT_SCALE, BesselBasis, EdgeCutoffs
from pes_calc.nn.scatter import neighbor_normalization
from pes_calc.nn.tensor_product import EdgeTensorProduct
from pes_calc.potential import Architecture

DEFAULT_HYPERS: dict = {
    "r_max": 5.0,
    "l_max": 1,
    "parity": True,
    "num_layers": 4,
    "num_features": 32,
    "type_embed_num_features": None,
    "radial_mlp_depth": 2,
    "radial_mlp_width": 64,
    "num_bessels": 8,
    "bessel_trainable": False,
    "polynomial_cutoff_p": 6,
    "per_edge_type_cutoff": None,
    "avg_num_neighbors": None,
    "readout_mlp_hidden_layers_depth": 0,
    "readout_mlp_hidden_layers_width": None,
    "readout_mlp_nonlinearity": "silu",
    "pair_potential": None,
}


def hidden_irreps(num_features: int, l_max: int, parity: bool) -> o3.Irreps:
    """num_features copies of every (l, p) up to l_max; without parity only the
    spherical-harmonic parities p = (-1)^l."""
    return o3.Irreps(
        [
            (num_features, (l, p))
            for l in range(l_max + 1)
            for p in ((1, -1) if parity else ((-1) ** l,))
        ]
    )


class Interaction(nn.Module):
    """One NequIP convolution + gated nonlinearity."""

    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_sh: o3.Irreps,
        irreps_target: o3.Irreps,
        num_species: int,
        num_bessels: int,
        radial_mlp_depth: int,
        radial_mlp_width: int,
        use_self_connection: bool,
    ):
        super().__init__()
        # keep only target irreps that irreps_in ⊗ irreps_sh can reach
        reachable = {
            ir_out
            for _, ir1 in irreps_in
            for _, ir2 in irreps_sh
            for ir_out in ir1 * ir2
        }
        scalars = o3.Irreps(
            [(m, ir) for m, ir in irreps_target if ir.l == 0 and ir in reachable]
        )
        gated = o3.Irreps(
            [(m, ir) for m, ir in irreps_target if ir.l > 0 and ir in reachable]
        )
        gates = (
            o3.Irreps(f"{gated.num_irreps}x0e") if gated.num_irreps else o3.Irreps("")
        )
        self.gate = Gate(
            scalars,
            # e3nn wants functions here; it normalises them to unit second moment
            [nn.functional.silu if ir.p == 1 else torch.tanh for _, ir in scalars],
            gates,
            [nn.functional.silu] * len(gates),
            gated,
        )
        irreps_gate_in = self.gate.irreps_in

        self.linear_in = o3.Linear(irreps_in, irreps_in)
        irreps_mid: List[Tuple[int, o3.Irrep]] = []
        instructions = []
        for i1, (mul, ir1) in enumerate(irreps_in):
            for i2, (_, ir2) in enumerate(irreps_sh):
                for ir_out in ir1 * ir2:
                    if ir_out in irreps_gate_in:
                        instructions.append((i1, i2, len(irreps_mid), "uvu", True))
                        irreps_mid.append((mul, ir_out))
        self.tensor_product = o3.TensorProduct(
            irreps_in,
            irreps_sh,
            o3.Irreps(irreps_mid),
            instructions,
            shared_weights=False,
            internal_weights=False,
        )
        # the e3nn module declares the paths and their normalisation (and keeps the
        # model file's keys); the gather-product-scatter arithmetic runs here
        self.convolution = EdgeTensorProduct(self.tensor_product)
        self.radial = MLP(
            num_bessels,
            [radial_mlp_width] * radial_mlp_depth,
            self.tensor_product.weight_numel,
            normalized=True,
        )
        # as if the input were nequip's Bessel basis n sinc(nx) = sin(nπx)/(πx), 1/(√2π)
        # of ours: radial weights start at ~0.15, not ~1, and the self-connection
        # dominates at initialisation. With unit radial weights the gates (features ×
        # activated features) square every per-layer gain above 1 (coherent sums over
        # a crystal's neighbor shells, convolution + self-connection): node features
        # of an untrained 4-layer model reached 10²-10⁴ on rattled fcc Cu.
        normalized_init_(self.radial[0], gain=RADIAL_INPUT_SCALE)
        self.linear_out = o3.Linear(o3.Irreps(irreps_mid), irreps_gate_in)
        self.use_self_connection = use_self_connection
        self.self_connection = (
            o3.FullyConnectedTensorProduct(
                irreps_in, f"{num_species}x0e", irreps_gate_in
            )
            if use_self_connection
            else None
        )
        self.irreps_out = self.gate.irreps_out

    def forward(
        self,
        features: Tensor,
        one_hot: Tensor,
        harmonics: Tensor,
        radial_basis: Tensor,
        edge_index: Tensor,
        neighbor_normalization: Tensor,
    ) -> Tensor:
        """(N, irreps_in) node features → (N, irreps_out)."""
        weights = self.radial(radial_basis)
        aggregated = self.convolution(
            self.linear_in(features), harmonics, weights, edge_index
        )
        updated = self.linear_out(aggregated * neighbor_normalization.unsqueeze(-1))
        self_connection = self.self_connection
        if self_connection is not None:
            updated = updated + self_connection(features, one_hot)
        return self.gate(updated)


class NequIP(Architecture):
    """NequIP energy model: per-atom energies and their last-layer features."""

    def __init__(self, species: Sequence[str], hypers: Dict):
        super().__init__()
        self.num_species = len(species)
        self.cutoff = float(hypers["r_max"])
        self.polynomial_cutoff_p = float(hypers["polynomial_cutoff_p"])
        self.edge_cutoffs = EdgeCutoffs(
            species, self.cutoff, hypers["per_edge_type_cutoff"]
        )
        self.bessel = BesselBasis(hypers["num_bessels"], hypers["bessel_trainable"])
        irreps_sh = o3.Irreps.spherical_harmonics(hypers["l_max"])
        self.spherical_harmonics = o3.SphericalHarmonics(
            irreps_sh, normalize=True, normalization="component"
        )
        num_features = int(hypers["num_features"])
        embed = hypers["type_embed_num_features"] or num_features
        # a one-hot input selects one weight per feature: unit variance (fan_in 1)
        self.type_embedding = normalized_init_(
            nn.Linear(self.num_species, embed, bias=False), fan_in=1
        )
        hidden = hidden_irreps(num_features, hypers["l_max"], hypers["parity"])
        irreps = o3.Irreps(f"{embed}x0e")
        layers = []
        for k in range(int(hypers["num_layers"])):
            last = k == hypers["num_layers"] - 1
            layer = Interaction(
                irreps,
                irreps_sh,
                o3.Irreps(f"{num_features}x0e") if last else hidden,
                self.num_species,
                hypers["num_bessels"],
                hypers["radial_mlp_depth"],
                hypers["radial_mlp_width"],
                use_self_connection=k
                > 0,  # no self-connection keeps isolated atoms exact
            )
            layers.append(layer)
            irreps = layer.irreps_out
        self.layers = nn.ModuleList(layers)
        self.readout_hidden, self.last_layer = readout(
            num_features,
            hypers["readout_mlp_hidden_layers_depth"],
            hypers["readout_mlp_hidden_layers_width"] or num_features,
            hypers["readout_mlp_nonlinearity"],
        )
        self.register_buffer(
            "neighbor_normalization",
            neighbor_normalization(species, hypers["avg_num_neighbors"]),
            persistent=False,
        )

    def forward(self, graph: AtomicGraph, vectors: Tensor) -> Tuple[Tensor, Tensor]:
        """Raw per-atom energies (N,) and last-layer features (N, F)."""
        i, j = graph.edge_index[0], graph.edge_index[1]
        lengths = torch.linalg.vector_norm(vectors, dim=-1)
        x = self.edge_cutoffs.normalized_lengths(
            lengths, graph.species[i], graph.species[j]
        )
        envelope = polynomial_envelope(x, 1.0, self.polynomial_cutoff_p)
        radial_basis = self.bessel(x) * envelope.unsqueeze(-1)  # (E, num_bessels)
        harmonics = self.spherical_harmonics(vectors)  # (E, (l_max+1)²)
        one_hot = nn.functional.one_hot(graph.species, self.num_species).to(
            vectors.dtype
        )
        normalization = self.neighbor_normalization.to(vectors.dtype)[graph.species]
        features = self.type_embedding(one_hot)
        for layer in self.layers:
            features = layer(
                features,
                one_hot,
                harmonics,
                radial_basis,
                graph.edge_index,
                normalization,
            )
        features = self.readout_hidden(features)
        return self.last_layer(features).squeeze(-1), features
