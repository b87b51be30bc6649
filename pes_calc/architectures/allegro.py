"""Allegro: strictly local equivariant edge model, two tracks (Musaelian et al. 2023).

Hyperparameter names and defaults are nequip-allegro's ``AllegroModel``. Every edge
ij carries scalar latents x_ij and tensor features V_ij (num_tensor_features
channels of each irrep); all sums run over the neighbors k of the centre i only.

| step | code | formula |
|---|---|---|
| two-body scalar | `radial_chemical_embed` + | x⁰_ij = MLP(R(r_ij/r_c; t_i, t_j)) |
| embedding | `scalar_embed_mlp` | |
| tensor embedding | `weighted_harmonics` | V⁰_ij = w(x⁰_ij) · Y(r̂_ij), per channel |
| | | and irrep |
| environment | `scatter_sum` | Γ_i = Σ_k w_ik(x_ik) · Y(r̂_ik) / √avg_num_neighbors |
| tensor track | `tensor_products[k]` | V_ij ← V_ij ⊗ Γ_i, channel-wise ('uuu'), |
| | | as V_ij · M_i (M_i = W · Γ_i per atom) |
| scalar track | `latent_mlps[k]` | x^{k+1}_ij = MLP([x⁰..x^k, scalars of V_ij]) |
| edge energy | `readout_hidden` → `last_layer` | ε_ij = w · h_ij, |
| | | h_ij = MLP([x⁰..x^L]) |
| atom energy | `Allegro.forward` | e_i = Σ_j ε_ij / √avg_num_neighbors |

Every MLP is bias-free and the radial embedding carries the polynomial envelope, so
every edge quantity goes smoothly to zero at its cutoff.

Initialisation preserves variance, as in nequip-allegro: every MLP and linear layer
has weights of standard deviation 1/√fan_in and unit-second-moment activations
(`pes_calc.nn.mlp`), e3nn's tensor products are normalised, so the scalar latents and
the tensor track of an untrained model stay O(1) through the layers (with PyTorch's
default init the tensor track shrank ~100× per layer). That needs avg_num_neighbors
near the actual mean neighbor count: without it every environment Γ_i grows like
√neighbors, and the tensor track, a product of them, with its power.
"""

from typing import Dict, List, Sequence, Tuple

import torch
from e3nn import o3
from torch import Tensor, nn

from pes_calc.config import merge_hypers
from pes_calc.graph import AtomicGraph, number_of_atoms
from pes_calc.nn.channel_tensor_product import (
    ChannelTensorProduct,
    irrep_index,
    weighted_harmonics,
)
from pes_calc.nn.mlp import MLP, normalized_init_, readout
from pes_calc.nn.radial import EdgeCutoffs
from pes_calc.nn.scatter import neighbor_normalization, scatter_sum
from pes_calc.nn.two_body import RADIAL_EMBEDS, BesselEmbedding, SplineEmbedding
from pes_calc.potential import Architecture

DEFAULT_HYPERS: dict = {
    "r_max": 5.0,
    "l_max": 2,
    "parity": True,
    "num_layers": 2,
    "num_scalar_features": 64,
    "num_tensor_features": 16,
    "radial_chemical_embed": None,  # None: TwoBodyBesselScalarEmbed with its defaults
    # nequip-allegro's name for the embedding's output width (scalar_embed_output_dim)
    "radial_chemical_embed_dim": None,
    "two_body_mlp_hidden_layers_depth": 2,
    "two_body_mlp_hidden_layers_width": 64,
    "two_body_mlp_nonlinearity": "silu",
    "scalar_embed_output_dim": None,
    "scalar_embed_mlp_hidden_layers_depth": 1,
    "scalar_embed_mlp_hidden_layers_width": 64,
    "scalar_embed_mlp_nonlinearity": "silu",
    "allegro_mlp_hidden_layers_depth": 1,
    "allegro_mlp_hidden_layers_width": 64,
    "allegro_mlp_nonlinearity": "silu",
    "tp_path_channel_coupling": True,
    "readout_mlp_hidden_layers_depth": 1,
    "readout_mlp_hidden_layers_width": 32,
    "readout_mlp_nonlinearity": "silu",
    "per_edge_type_cutoff": None,
    "avg_num_neighbors": None,
    "pair_potential": None,
}


def tensor_track_irreps(
    irreps_sh: o3.Irreps, allowed: o3.Irreps, num_layers: int
) -> List[o3.Irreps]:
    """Irreps of the tensor track before each layer and after the last (scalars only),
    keeping only irreps that are reachable forwards and useful backwards."""
    track = [irreps_sh]
    for layer in range(num_layers):
        wanted = o3.Irreps("0e") if layer == num_layers - 1 else allowed
        track.append(
            o3.Irreps(
                [
                    (1, ir)
                    for _, ir in wanted
                    if any(ir in a * b for _, a in track[-1] for _, b in irreps_sh)
                ]
            )
        )
    for layer in range(num_layers - 1, 0, -1):  # drop irreps no later path uses
        track[layer] = o3.Irreps(
            [
                (1, a)
                for _, a in track[layer]
                if any(
                    out in a * b for _, b in irreps_sh for _, out in track[layer + 1]
                )
            ]
        )
    return track


class Allegro(Architecture):
    """Allegro energy model: per-atom energies and last-layer features."""

    def __init__(self, species: Sequence[str], hypers: Dict):
        super().__init__()
        self.num_species = len(species)
        self.cutoff = float(hypers["r_max"])
        self.num_layers = int(hypers["num_layers"])
        if self.num_layers < 1:
            raise ValueError("Allegro needs num_layers ≥ 1")
        scalars = int(hypers["num_scalar_features"])
        channels = int(hypers["num_tensor_features"])
        self.num_scalar_features = scalars
        self.num_tensor_features = channels
        self.edge_cutoffs = EdgeCutoffs(
            species, self.cutoff, hypers["per_edge_type_cutoff"]
        )

        embed = dict(hypers["radial_chemical_embed"] or {})
        name = embed.pop("name", "TwoBodyBesselScalarEmbed")
        # nequip's form names the class: `_target_: allegro.nn.TwoBodyBesselScalarEmbed`
        target = embed.pop("_target_", None)
        if target is not None:
            if (
                "name" in (hypers["radial_chemical_embed"] or {})
                and target.rsplit(".", 1)[-1] != name
            ):
                raise ValueError(
                    f"radial_chemical_embed: _target_ {target!r} and name {name!r} "
                    "differ"
                )
            name = str(target).rsplit(".", 1)[-1]
        if name not in RADIAL_EMBEDS:
            raise ValueError(
                f"unknown radial_chemical_embed {name!r}; "
                f"choose from {sorted(RADIAL_EMBEDS)}"
            )
        embed = merge_hypers(RADIAL_EMBEDS[name], embed, "radial_chemical_embed.")
        widths = {
            hypers["scalar_embed_output_dim"],
            hypers["radial_chemical_embed_dim"],
        } - {None}
        if len(widths) > 1:
            raise ValueError(
                "scalar_embed_output_dim and radial_chemical_embed_dim name one width: "
                "give one"
            )
        embed_dim = widths.pop() if widths else scalars
        if name == "TwoBodyBesselScalarEmbed":
            radial = BesselEmbedding(self.num_species, embed)
            two_body = MLP(
                radial.out_features,
                [hypers["two_body_mlp_hidden_layers_width"]]
                * hypers["two_body_mlp_hidden_layers_depth"],
                embed_dim,
                nonlinearity=hypers["two_body_mlp_nonlinearity"],
                normalized=True,
            )
        else:
            radial = SplineEmbedding(self.num_species, embed, embed_dim)
            two_body = nn.Sequential()
        self.radial_embedding = radial
        self.two_body_mlp = two_body
        self.scalar_embed_mlp = MLP(
            embed_dim,
            [hypers["scalar_embed_mlp_hidden_layers_width"]]
            * hypers["scalar_embed_mlp_hidden_layers_depth"],
            scalars,
            nonlinearity=hypers["scalar_embed_mlp_nonlinearity"],
            normalized=True,
        )

        irreps_sh = o3.Irreps.spherical_harmonics(hypers["l_max"], p=-1)
        self.spherical_harmonics = o3.SphericalHarmonics(
            irreps_sh, normalize=True, normalization="component"
        )
        self.ls: List[int] = [ir.l for _, ir in irreps_sh]
        allowed = (
            o3.Irreps(
                [(1, (l, p)) for l in range(hypers["l_max"] + 1) for p in (1, -1)]
            )
            if hypers["parity"]
            else irreps_sh
        )
        track = tensor_track_irreps(irreps_sh, allowed, self.num_layers)
        env_weights = channels * len(self.ls)
        self.register_buffer(
            "irrep_of_component", irrep_index(irreps_sh), persistent=False
        )
        self.tensor_embedding = nn.Linear(scalars, env_weights, bias=False)
        self.first_env_weights = nn.Linear(scalars, env_weights, bias=False)
        normalized_init_(self.tensor_embedding)
        normalized_init_(self.first_env_weights)

        coupling = bool(hypers["tp_path_channel_coupling"])
        latent_hidden = [hypers["allegro_mlp_hidden_layers_width"]] * hypers[
            "allegro_mlp_hidden_layers_depth"
        ]
        tensor_products, latent_mlps = [], []
        env_irreps = o3.Irreps([(channels, ir) for _, ir in irreps_sh])
        for layer in range(self.num_layers):
            arg_irreps = o3.Irreps([(channels, ir) for _, ir in track[layer]])
            out_irreps = o3.Irreps([(channels, ir) for _, ir in track[layer + 1]])
            instructions = [
                (i1, i2, i_out, "uuu", True)
                for i1, (_, a) in enumerate(arg_irreps)
                for i2, (_, b) in enumerate(env_irreps)
                for i_out, (_, out) in enumerate(out_irreps)
                if out in a * b
            ]
            tensor_products.append(
                ChannelTensorProduct(
                    arg_irreps, env_irreps, out_irreps, instructions, coupling
                )
            )
            last = layer == self.num_layers - 1
            latent_mlps.append(
                MLP(
                    scalars * (layer + 1) + channels,
                    latent_hidden,
                    scalars + (0 if last else env_weights),
                    nonlinearity=hypers["allegro_mlp_nonlinearity"],
                    normalized=True,
                )
            )
        self.tensor_products = nn.ModuleList(tensor_products)
        self.latent_mlps = nn.ModuleList(latent_mlps)

        self.readout_hidden, self.last_layer = readout(
            scalars * (self.num_layers + 1),
            hypers["readout_mlp_hidden_layers_depth"],
            hypers["readout_mlp_hidden_layers_width"],
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
        species_i, species_j = graph.species[i], graph.species[j]
        num_atoms = number_of_atoms(graph)
        lengths = torch.linalg.vector_norm(vectors, dim=-1)
        x = self.edge_cutoffs.normalized_lengths(lengths, species_i, species_j)
        normalization = self.neighbor_normalization.to(vectors.dtype)[graph.species]

        embedding = self.two_body_mlp(self.radial_embedding(x, species_i, species_j))
        latents = self.scalar_embed_mlp(embedding)  # (E, S)
        harmonics = self.spherical_harmonics(vectors)  # (E, Σ 2l+1)
        num_edges, channels, num_irreps = (
            harmonics.shape[0],
            self.num_tensor_features,
            len(self.ls),
        )
        # the tensor track is channel-major, (E, C, Σ 2l+1): see ChannelTensorProduct
        tensors = weighted_harmonics(
            self.tensor_embedding(latents).view(num_edges, channels, num_irreps),
            harmonics,
            self.irrep_of_component,
        )
        env_weights = self.first_env_weights(latents)
        accumulated = [latents]
        for layer, (tensor_product, latent_mlp) in enumerate(
            zip(self.tensor_products, self.latent_mlps)
        ):
            edge_env = weighted_harmonics(
                env_weights.view(num_edges, channels, num_irreps),
                harmonics,
                self.irrep_of_component,
            )
            environment = scatter_sum(edge_env, i, num_atoms) * normalization.view(
                -1, 1, 1
            )  # (N, C, Σ 2l+1)
            tensors = tensor_product(tensors, environment, i)
            # component 0 of every channel is its 0e: the scalars of the tensor track
            new = latent_mlp(torch.cat(accumulated + [tensors[:, :, 0]], dim=-1))
            if layer < self.num_layers - 1:
                # split, not slices: slicing backward would allocate zero-filled (E, ·)
                # gradients
                new_latents, env_weights = new.split(
                    [self.num_scalar_features, new.shape[1] - self.num_scalar_features],
                    dim=-1,
                )
                accumulated.append(new_latents)
            else:
                accumulated.append(new)
        edge_features = self.readout_hidden(torch.cat(accumulated, dim=-1))  # (E, W)
        features = scatter_sum(edge_features, i, num_atoms) * normalization.unsqueeze(
            -1
        )
        return self.last_layer(features).squeeze(-1), features
