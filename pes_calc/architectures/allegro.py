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

import math
from typing import Dict, List, Sequence, Tuple

import torch
from e3nn import o3
from torch import Tensor, nn

import pes_calc.nn.gather  # noqa: F401 (registers torch.ops.pes_calc.gathered_matvec)
from pes_calc.config import merge_hypers
from pes_calc.graph import AtomicGraph, number_of_atoms
from pes_calc.nn.cutoffs import polynomial_envelope
from pes_calc.nn.mlp import MLP, normalized_init_, readout
from pes_calc.nn.radial import BesselBasis, EdgeCutoffs
from pes_calc.nn.scatter import neighbor_normalization, scatter_sum
from pes_calc.potential import Architecture

# our BesselBasis (√2 sin(nπx)/x) in units of nequip-allegro's (n sinc(nx) =
# sin(nπx)/(πx)), as in pes_calc.architectures.nequip: the Bessel projection starts
# from the weights nequip-allegro's would have on its basis. Only the initial weights
# change; a given state dict computes the same numbers.
RADIAL_INPUT_SCALE = 1.0 / (math.sqrt(2.0) * math.pi)

RADIAL_EMBEDS: Dict[str, dict] = {
    "TwoBodyBesselScalarEmbed": {
        "num_bessels": 8,
        "bessel_trainable": False,
        "polynomial_cutoff_p": 6,
        "two_body_embedding_dim": 32,
    },
    "TwoBodySplineScalarEmbed": {
        "num_splines": 8,
        "spline_span": 3,
        "polynomial_cutoff_p": 6,
    },
}

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


class BesselEmbedding(nn.Module):
    """TwoBodyBesselScalarEmbed: Bessel basis × envelope, projected and multiplied by
    a learned embedding of the (centre, neighbor) type pair."""

    def __init__(self, num_species: int, hypers: Dict):
        super().__init__()
        self.num_species = num_species
        self.polynomial_cutoff_p = float(hypers["polynomial_cutoff_p"])
        self.bessel = BesselBasis(hypers["num_bessels"], hypers["bessel_trainable"])
        num_bessels, width = hypers["num_bessels"], hypers["two_body_embedding_dim"]
        # initial weights as if the input were nequip's Bessel basis (see
        # RADIAL_INPUT_SCALE); with unit-scale weights the tensor track of an untrained
        # model sits at the edge of a runaway (environments ~ √neighbors · mean weight,
        # fed back through the latents into the next layer's environment weights)
        self.projection = normalized_init_(
            nn.Linear(num_bessels, width, bias=False), gain=RADIAL_INPUT_SCALE
        )
        self.pair_embedding = nn.Embedding(
            num_species * num_species, hypers["two_body_embedding_dim"]
        )
        self.out_features = int(hypers["two_body_embedding_dim"])

    def forward(self, x: Tensor, species_i: Tensor, species_j: Tensor) -> Tensor:
        envelope = polynomial_envelope(x, 1.0, self.polynomial_cutoff_p)
        radial = self.projection(self.bessel(x) * envelope.unsqueeze(-1))
        return radial * self.pair_embedding(species_i * self.num_species + species_j)


class SplineEmbedding(nn.Module):
    """TwoBodySplineScalarEmbed: per type-pair coefficients of uniform B-splines of
    degree spline_span - 1 on x ∈ [0, 1], times the polynomial envelope."""

    def __init__(self, num_species: int, hypers: Dict, out_features: int):
        super().__init__()
        self.num_species = num_species
        self.num_splines = int(hypers["num_splines"])
        self.degree = int(hypers["spline_span"]) - 1
        if self.num_splines < 2 or self.degree < 1:
            raise ValueError(
                "TwoBodySplineScalarEmbed needs num_splines ≥ 2, spline_span ≥ 2"
            )
        self.polynomial_cutoff_p = float(hypers["polynomial_cutoff_p"])
        self.out_features = out_features
        self.coefficients = nn.Embedding(
            num_species * num_species, self.num_splines * out_features
        )
        nn.init.uniform_(
            self.coefficients.weight,
            -math.sqrt(3.0 / self.degree),
            math.sqrt(3.0 / self.degree),
        )
        # cardinal B-spline of degree d = Σ_j (-1)^j C(d+1, j) (t - j)₊^d / d!
        terms = [
            (-1.0) ** j * math.comb(self.degree + 1, j) / math.factorial(self.degree)
            for j in range(self.degree + 2)
        ]
        self.register_buffer(
            "terms", torch.tensor(terms, dtype=torch.float64), persistent=False
        )

    def forward(self, x: Tensor, species_i: Tensor, species_j: Tensor) -> Tensor:
        spacing = 1.0 / (self.num_splines - 1)
        centres = (
            torch.arange(self.num_splines, dtype=x.dtype, device=x.device) * spacing
        )
        t = (x.unsqueeze(-1) - centres) / spacing + 0.5 * (self.degree + 1)  # (E, K)
        shifts = torch.arange(self.degree + 2, dtype=x.dtype, device=x.device)
        powers = (
            torch.clamp(t.unsqueeze(-1) - shifts, min=0.0) ** self.degree
        )  # (E, K, d+2)
        basis = (powers * self.terms.to(x.dtype)).sum(-1)  # (E, K)
        # beyond its support (t ≥ d + 1) the truncated-power sum is zero only up to
        # rounding of terms ~ t^d (1e-3 in float32 for 32 splines): make it exact
        basis = torch.where(t < self.degree + 1, basis, torch.zeros_like(basis))
        coefficients = self.coefficients(species_i * self.num_species + species_j)
        coefficients = coefficients.view(-1, self.num_splines, self.out_features)
        envelope = polynomial_envelope(x, 1.0, self.polynomial_cutoff_p)
        return (basis.unsqueeze(-1) * coefficients).sum(1) * envelope.unsqueeze(-1)


def weighted_harmonics(
    weights: Tensor, harmonics: Tensor, irrep_of_component: Tensor
) -> Tensor:
    """Channels of weighted spherical harmonics, channel-major: (E, C, Σ 2l+1).

    ``weights`` (E, C, n_irreps) scales each irrep block of ``harmonics`` (E, Σ 2l+1)
    per channel; ``irrep_of_component`` (Σ 2l+1,) names the irrep of each component.
    """
    return weights.index_select(-1, irrep_of_component) * harmonics.unsqueeze(1)


def irrep_index(irreps: o3.Irreps) -> Tensor:
    """(Σ 2l+1,) position in ``irreps`` of each component of one channel."""
    return torch.tensor(
        [k for k, (_, ir) in enumerate(irreps) for _ in range(ir.dim)], dtype=torch.long
    )


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


class ChannelTensorProduct(nn.Module):
    """Channel-wise ('uuu') tensor product of edge tensors with their centre's
    environment; path weights are per (path, channel) with ``tp_path_channel_coupling``,
    else one weight per path shared by channels.

    Both inputs and the output are channel-major, (rows, C, Σ 2l+1). The e3nn
    ``tensor_product`` holds the weights (and the state-dict layout); its paths are
    summed into one coupling tensor W[u, i, j, k], contracted with the environment
    per atom, M[n, u, i, k] = Σ_j Γ[n, u, j] W[u, i, j, k], so each edge costs one
    (Σ 2l+1)² matrix-vector product out[e, u] = V[e, u] · M[centre(e), u], not an
    outer product per path (e3nn's forward, ~3× slower and larger on CPU).
    """

    def __init__(
        self,
        irreps_1: o3.Irreps,
        irreps_2: o3.Irreps,
        irreps_out: o3.Irreps,
        instructions: list,
        coupling: bool,
    ):
        super().__init__()
        self.coupling = coupling
        self.tensor_product = o3.TensorProduct(
            irreps_1,
            irreps_2,
            irreps_out,
            instructions,
            internal_weights=coupling,
            shared_weights=True,
        )
        self.channels = irreps_out[0].mul
        num_paths = len(instructions)
        self.num_paths = num_paths
        self.path_weights = nn.Parameter(torch.randn(0 if coupling else num_paths))
        self.broadcast_contraction = False  # see prepare_for_export
        # per path: a scale (a Python float, kept exact in any model dtype) × a pattern
        # of Wigner 3j symbols in the (i, j, k) block of its irreps. Where e3nn's
        # forward uses exact constants (an l = 0 irrep, or 1 ⊗ 1 → 1) the pattern is
        # 0/±1 and the scale carries 1/√dim, so a float32 build cast to float64 agrees
        # with it too
        offsets = [
            [0] + [sum(ir.dim for _, ir in irreps[: k + 1]) for k in range(len(irreps))]
            for irreps in (irreps_1, irreps_2, irreps_out)
        ]
        dims = [offset[-1] for offset in offsets]
        patterns = torch.zeros(
            num_paths, dims[0], dims[1], dims[2], dtype=torch.float64
        )
        path_scales: List[float] = []
        for p, ins in enumerate(self.tensor_product.instructions):
            ls = (
                irreps_1[ins.i_in1].ir.l,
                irreps_2[ins.i_in2].ir.l,
                irreps_out[ins.i_out].ir.l,
            )
            (a1, b1), (a2, b2), (a3, b3) = [
                (o[k], o[k + 1])
                for o, k in zip(offsets, (ins.i_in1, ins.i_in2, ins.i_out))
            ]
            wigner = o3.wigner_3j(*ls, dtype=torch.float64)
            exact = (
                6.0 if ls == (1, 1, 1) else float(2 * max(ls) + 1) if 0 in ls else 0.0
            )
            if exact:
                wigner = torch.round(wigner * math.sqrt(exact))
            patterns[p, a1:b1, a2:b2, a3:b3] = wigner
            path_scales.append(
                ins.path_weight / math.sqrt(exact) if exact else ins.path_weight
            )
        self.register_buffer(
            "patterns", patterns.to(torch.get_default_dtype()), persistent=False
        )
        # a plain attribute, not a buffer: .to(float32) must not round the scales
        self.path_scales = torch.tensor(path_scales, dtype=torch.float64)

    def forward(self, x: Tensor, environment: Tensor, centre: Tensor) -> Tensor:
        """``x`` (E, C, D₁) edge tensors, ``environment`` (N, C, D₂) per atom,
        ``centre`` (E,) each edge's atom → (E, C, D_out)."""
        if self.coupling:
            weight = self.tensor_product.weight.view(self.num_paths, self.channels)
        else:
            weight = self.path_weights.unsqueeze(-1).expand(
                self.num_paths, self.channels
            )
        # a few numbers per call; a TorchScript artefact's .to() cannot recast a buffer
        # from the float64 master (on a GPU this is a small host-to-device copy)
        scales = self.path_scales.to(device=weight.device, dtype=weight.dtype)
        # W[u, j, (i, k)], so that the per-atom contraction over j is one batched matmul
        coupling = torch.einsum(
            "pu,pijk->ujik", weight * scales.unsqueeze(-1), self.patterns
        )
        dim_1, dim_out = self.patterns.shape[1], self.patterns.shape[3]
        per_atom = torch.bmm(
            environment.transpose(0, 1),
            coupling.reshape(self.channels, -1, dim_1 * dim_out),
        )
        per_atom = per_atom.transpose(0, 1).reshape(
            -1, self.channels, dim_1, dim_out
        )  # (N, C, D₁, D_out)
        if self.broadcast_contraction:
            # each edge reads its centre's matrices (E, C, D₁, D_out), which autograd
            # keeps
            per_edge = per_atom.index_select(0, centre)
            return (x.unsqueeze(-1) * per_edge).sum(-2)
        # the same in chunks of edges, keeping no per-edge matrices
        # (pes_calc/nn/gather.py)
        return torch.ops.pes_calc.gathered_matvec(x, per_atom, centre)

    def prepare_for_export(self) -> None:
        """Contract by gather, multiply and sum, which inductor fuses into one loop (the
        chunked operator of eager and TorchScript is Python, which a compiled package
        cannot call)."""
        self.broadcast_contraction = True
