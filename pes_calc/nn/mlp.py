"""Multi-layer perceptrons, and one-network-per-species (Behler–Parrinello) wrappers.

Two initialisations of the linear layers (n: a layer's input width, fan_in):

| init | `MLP` | weights | activations |
|---|---|---|---|
| PyTorch's default | `normalized=False` | U(±1/√n): variance 1/(3n) | as named |
| variance preserving | `normalized=True` | U(±√(3/n)): variance 1/n | unit 2nd moment |

(`normalized_init_` gives a lone ``nn.Linear`` the second init, and
`NormalizedActivation` scales an activation to unit second moment.)

With the default a unit-variance input shrinks by about √3 per linear layer (and more
through each activation), so deep stacks (NequIP's and Allegro's MLPs, interleaved
with tensor products) start with vanishing activations. The variance-preserving init
is e3nn's and nequip's: unit second moment in gives unit second moment out, for every
layer. SOAP-BPNN keeps PyTorch's default, as metatrain does.
"""

import functools
import math
from typing import List, Sequence, Tuple

import torch
from e3nn.math import moment
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


@functools.cache
def second_moment_scale(name: str) -> float:
    """c with E[(c f(z))²] = 1 for z ~ N(0, 1), f the activation ``name``.

    The constant of e3nn's ``normalize2mom`` (the same 10⁶ seeded samples), computed
    once per activation instead of once per layer (~60 ms each).
    """
    with torch.no_grad():
        second = moment(activation(name), 2, torch.float64, torch.device("cpu"))
    return float(second) ** -0.5


class NormalizedActivation(nn.Module):
    """``scale · f(x)`` with unit second moment for unit-normal ``x``: e3nn's
    ``normalize2mom``, as a plain module that ``torch.jit.script`` accepts
    (e3nn's is traced)."""

    scale: float

    def __init__(self, name: str):
        super().__init__()
        self.activation = activation(name)
        self.scale = second_moment_scale(name)

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(x) * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6f}"


def normalized_init_(
    linear: nn.Linear, fan_in: int | None = None, gain: float = 1.0
) -> nn.Linear:
    """Re-initialise ``linear`` in place to weights U(±gain √(3/fan_in)) (standard
    deviation gain/√fan_in) and zero bias: with gain 1, inputs of unit second moment
    give outputs of unit second moment. ``fan_in`` defaults to ``in_features``; pass 1
    for a one-hot input (one weight per output, as an ``nn.Embedding`` of unit
    variance)."""
    bound = gain * math.sqrt(3.0 / (linear.in_features if fan_in is None else fan_in))
    with torch.no_grad():
        nn.init.uniform_(linear.weight, -bound, bound)
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)
    return linear


def MLP(
    in_features: int,
    hidden_features: Sequence[int],
    out_features: int | None = None,
    *,
    nonlinearity: str | None = "silu",
    bias: bool = False,
    normalized: bool = False,
) -> nn.Sequential:
    """Linear → activation blocks for each hidden width, then an optional linear
    output layer without activation (omitted when ``out_features`` is None).

    ``normalized``: variance-preserving init (`normalized_init_` for every linear
    layer, each activation a `NormalizedActivation`): unit-variance inputs keep an
    O(1) second moment through every layer. Otherwise PyTorch's default init.
    """
    layers: List[nn.Module] = []
    width = in_features

    def linear(fan_in: int, fan_out: int) -> nn.Linear:
        layer = nn.Linear(fan_in, fan_out, bias=bias)
        return normalized_init_(layer) if normalized else layer

    def nonlinear() -> nn.Module:
        if normalized and nonlinearity is not None and nonlinearity != "none":
            return NormalizedActivation(nonlinearity)
        return activation(nonlinearity)

    for hidden in hidden_features:
        layers += [linear(width, hidden), nonlinear()]
        width = hidden
    if out_features is not None:
        layers.append(linear(width, out_features))
    return nn.Sequential(*layers)


def readout(
    in_features: int, depth: int, width: int, nonlinearity: str | None
) -> Tuple[nn.Sequential, nn.Linear]:
    """NequIP's and Allegro's readout: a variance-preserving hidden MLP (``depth``
    layers of ``width``; none for depth 0) and the bias-free ``last_layer`` whose
    input is the architecture's last-layer features."""
    hidden = MLP(
        in_features, [width] * depth, nonlinearity=nonlinearity, normalized=True
    )
    last_layer = normalized_init_(
        nn.Linear(width if depth else in_features, 1, bias=False)
    )
    return hidden, last_layer


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
