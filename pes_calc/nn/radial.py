"""Radial encodings of edge lengths shared by NequIP and Allegro.

| symbol | code | meaning |
|---|---|---|
| r_c(a, b) | `EdgeCutoffs` | cutoff of an edge from a type-a centre to a type-b |
| | | neighbor, Å |
| x = r / r_c | `EdgeCutoffs.normalized_lengths` | edge length in units of its cutoff |
| b_n(x) = √2 sin(nπx) / x | `BesselBasis` | Bessel basis on [0, 1], |
| | | n = 1..num_bessels |
| u(x) | `polynomial_envelope` (p) | smooth cutoff, zero for x ≥ 1 |
"""

import math
from typing import Dict, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn


class EdgeCutoffs(nn.Module):
    """Per edge-type cutoffs: r_max, optionally lowered per (centre, neighbor) type.

    ``per_edge_type_cutoff`` follows nequip: ``{"H": 3.0, "C": {"H": 3.5, "C": 4.0}}``
    — a number applies to every neighbor of that centre type, a mapping to the named
    neighbor types; unnamed pairs keep ``r_max``. Values may not exceed ``r_max``.
    """

    def __init__(
        self,
        species: Sequence[str],
        r_max: float,
        per_edge_type_cutoff: Optional[
            Mapping[str, Union[float, Mapping[str, float]]]
        ] = None,
    ):
        super().__init__()
        index = {symbol: i for i, symbol in enumerate(species)}
        cutoffs = torch.full(
            (len(species), len(species)), float(r_max), dtype=torch.float64
        )
        for centre, value in (per_edge_type_cutoff or {}).items():
            if centre not in index:
                raise ValueError(
                    f"per_edge_type_cutoff names {centre!r}, not a model species"
                )
            targets: Dict[str, float] = (
                dict(value)
                if isinstance(value, Mapping)
                else dict.fromkeys(species, value)
            )
            for neighbor, cutoff in targets.items():
                if neighbor not in index:
                    raise ValueError(
                        f"per_edge_type_cutoff names {neighbor!r}, not a model species"
                    )
                if not 0.0 < float(cutoff) <= r_max:
                    raise ValueError(
                        f"per_edge_type_cutoff {centre}-{neighbor} = {cutoff} "
                        f"must be in (0, r_max = {r_max}]"
                    )
                cutoffs[index[centre], index[neighbor]] = float(cutoff)
        self.register_buffer("cutoffs", cutoffs, persistent=False)

    def normalized_lengths(
        self, lengths: Tensor, species_i: Tensor, species_j: Tensor
    ) -> Tensor:
        """x = r / r_c(t_i, t_j) for each edge (E,)."""
        return lengths / self.cutoffs[species_i, species_j].to(lengths.dtype)


# our BesselBasis (√2 sin(nπx)/x) in units of nequip's (n sinc(nx) = sin(nπx)/(πx)):
# a first radial layer initialised with this gain starts from the weights nequip's
# would have on its basis
RADIAL_INPUT_SCALE = 1.0 / (math.sqrt(2.0) * math.pi)


class BesselBasis(nn.Module):
    """b_n(x) = √2 sin(nπx) / x on normalised lengths x ∈ (0, 1]; the frequencies nπ
    are trainable when ``trainable``."""

    def __init__(self, num_bessels: int = 8, trainable: bool = False):
        super().__init__()
        frequencies = math.pi * torch.arange(1, num_bessels + 1, dtype=torch.float64)
        self.frequencies = nn.Parameter(frequencies, requires_grad=trainable)

    def forward(self, x: Tensor) -> Tensor:
        """(E,) → (E, num_bessels)."""
        x = x.unsqueeze(-1)
        return math.sqrt(2.0) * torch.sin(self.frequencies * x) / x
