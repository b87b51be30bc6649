"""MLP layer structure, activations, species groups and per-species routing."""

import pytest
import torch
from torch import nn

from pes_calc.nn.mlp import MLP, PerSpecies, activation, species_groups


def test_mlp_layer_structure():
    mlp = MLP(4, [8, 6], 2)
    assert [type(m) for m in mlp] == [nn.Linear, nn.SiLU, nn.Linear, nn.SiLU, nn.Linear]
    shapes = [(m.in_features, m.out_features) for m in mlp if isinstance(m, nn.Linear)]
    assert shapes == [(4, 8), (8, 6), (6, 2)]
    assert all(m.bias is None for m in mlp if isinstance(m, nn.Linear))
    assert mlp(torch.randn(5, 4)).shape == (5, 2)


def test_mlp_variants():
    hidden_only = MLP(3, [5])  # no output layer: ends with the activation
    assert [type(m) for m in hidden_only] == [nn.Linear, nn.SiLU]
    linear = MLP(3, [], 1)
    assert [type(m) for m in linear] == [nn.Linear]
    with_bias = MLP(3, [5], 1, bias=True, nonlinearity="tanh")
    assert [type(m) for m in with_bias] == [nn.Linear, nn.Tanh, nn.Linear]
    assert all(m.bias is not None for m in with_bias if isinstance(m, nn.Linear))
    assert [type(m) for m in MLP(3, [5], nonlinearity=None)] == [nn.Linear, nn.Identity]


def test_mlp_computes_silu_of_products():
    torch.manual_seed(0)
    mlp = MLP(3, [4], 2)
    x = torch.randn(6, 3)
    w1, w2 = mlp[0].weight, mlp[2].weight
    torch.testing.assert_close(mlp(x), torch.nn.functional.silu(x @ w1.T) @ w2.T)


@pytest.mark.parametrize(
    "name, kind",
    [
        ("silu", nn.SiLU),
        ("mish", nn.Mish),
        ("gelu", nn.GELU),
        ("tanh", nn.Tanh),
        ("none", nn.Identity),
        (None, nn.Identity),
    ],  # noqa: E501
)
def test_activation(name, kind):
    assert type(activation(name)) is kind


def test_unknown_activation():
    with pytest.raises(ValueError, match="relu6"):
        activation("relu6")


def test_species_groups():
    groups = species_groups(torch.tensor([1, 0, 1, 2, 1]), 4)
    assert [g.tolist() for g in groups] == [[1], [0, 2, 4], [3], []]
    assert all(g.dtype == torch.int64 for g in groups)


@pytest.fixture
def per_species():
    torch.manual_seed(0)
    networks = [nn.Linear(3, 2, bias=True) for _ in range(3)]
    return PerSpecies(networks, out_features=2)


def test_per_species_routes_rows(per_species):
    torch.manual_seed(1)
    x = torch.randn(7, 3)
    species = torch.tensor([2, 0, 0, 2, 1, 2, 0])
    out = per_species(x, species_groups(species, 3))
    assert out.shape == (7, 2)
    for i, t in enumerate(species.tolist()):
        torch.testing.assert_close(out[i], per_species.networks[t](x[i]))
    # the networks really differ, so routing matters
    assert (per_species.networks[0](x) - per_species.networks[1](x)).abs().max() > 1e-3


def test_per_species_gradients_reach_only_used_networks(per_species):
    x = torch.randn(4, 3, requires_grad=True)
    species = torch.tensor([0, 2, 2, 0])  # no species 1
    per_species(x, species_groups(species, 3)).sum().backward()
    assert per_species.networks[0].weight.grad.abs().sum() > 0
    assert per_species.networks[2].weight.grad.abs().sum() > 0
    unused = per_species.networks[1].weight.grad
    assert unused is None or torch.all(unused == 0)
    assert x.grad.abs().sum() > 0


def test_per_species_scripts(per_species):
    scripted = torch.jit.script(per_species)
    x = torch.randn(5, 3)
    groups = species_groups(torch.tensor([0, 1, 2, 1, 0]), 3)
    torch.testing.assert_close(scripted(x, groups), per_species(x, groups))
