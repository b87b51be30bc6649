"""Two-body radial-chemical embeddings of an edge (nequip-allegro's names).

Each maps an edge's reduced length x = r_ij / r_c ∈ [0, 1] and its (centre,
neighbor) types to ``out_features`` scalars that vanish smoothly at x = 1 (the
polynomial envelope of order ``polynomial_cutoff_p``):

| ``_target_`` | class | formula |
|---|---|---|
| ``TwoBodyBesselScalarEmbed`` | `BesselEmbedding` | (W · B(x) u(x)) ⊙ e(t_i, t_j) |
| ``TwoBodySplineScalarEmbed`` | `SplineEmbedding` | Σ_k c_k(t_i, t_j) S_k(x) u(x) |

B: the Bessel basis, u: the envelope, e: a learned type-pair embedding, S_k:
uniform B-splines of degree ``spline_span`` - 1 with per type-pair coefficients c_k.
"""

import math
from typing import Dict

import torch
from torch import Tensor, nn

from pes_calc.nn.cutoffs import polynomial_envelope
from pes_calc.nn.mlp import normalized_init_
from pes_calc.nn.radial import RADIAL_INPUT_SCALE, BesselBasis

__all__ = ["RADIAL_EMBEDS", "BesselEmbedding", "SplineEmbedding"]

# each embedding's hyperparameters and defaults (nequip-allegro's)
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
