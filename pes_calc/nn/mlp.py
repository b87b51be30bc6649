"""Multi-layer perceptrons, and one-network-per-species (Behler–Parrinello) wrappers."""


from typing import List, Sequence

import torch
from torch import Tensor, nn

ACTIVATIONS = {"silu": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "tanh": nn.Tanh}


def activation(name: str | None) -> nn.Module:
    """The activation module called ``name`` (silu, mish, gelu, tanh, or none)."""
    if name is None or name == "none":
        return nn.Identity()
    if name not in ACTIVATIONS:
        raise ValueError(
            f"unknown nonlinearity {name!r}; choose from {sorted(ACTIVATIONS)} or none"
        )
    return ACTIVATIONS[name]()


def MLP(
    in_features: int,
    hidden_features: Sequence[int],
    out_features: int | None = None,
    *,
    nonlinearity: str | None = "silu",
    bias: bool = False,
) -> nn.Sequential:
    """Linear → activation blocks for each hidden width, then an optional linear
    output layer without activation (omitted when ``out_features`` is None)."""
    layers: List[nn.Module] = []
    width = in_features
    for hidden in hidden_features:
        layers += [nn.Linear(width, hidden, bias=bias), activation(nonlinearity)]
        width = hidden
    if out_features is not None:
        layers.append(nn.Linear(width, out_features, bias=bias))
    return nn.Sequential(*layers)


def species_groups(species: Tensor, num_species: int) -> List[Tensor]:
    """Indices of the atoms of each species: ``groups[t]`` is (N_t,) int64."""
    return [torch.nonzero(species == t).squeeze(-1) for t in range(num_species)]


class PerSpecies(nn.Module):
    """One copy of a network per species: row i of the input goes through network
    ``species[i]``, as in Behler–Parrinello networks."""

    def __init__(self, networks: Sequence[nn.Module], out_features: int):
        super().__init__()
        self.networks = nn.ModuleList(networks)
        self.out_features = out_features

    def forward(self, x: Tensor, groups: List[Tensor]) -> Tensor:
        """``x`` (N, in) → (N, out); ``groups`` from `species_groups`."""
        out = torch.zeros(
            (x.shape[0], self.out_features), dtype=x.dtype, device=x.device
        )
        for t, network in enumerate(self.networks):
            index = groups[t]
            out = out.index_copy(0, index, network(x.index_select(0, index)))
        return out
