"""MLP layer structure, activations, the variance-preserving init, species groups
and per-species routing."""

import math

import pytest
import torch
from torch import nn

from pes_calc.nn.mlp import (
    MLP,
    NormalizedActivation,
    PerSpecies,
    activation,
    normalized_init_,
    second_moment_scale,
    species_groups,
)


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


def second_moments(mlp: nn.Sequential, x: torch.Tensor) -> list:
    """E[y²] after every activation and after the output layer."""
    moments = []
    with torch.no_grad():
        for module in mlp:
            x = module(x)
            if not isinstance(module, nn.Linear) or module is mlp[-1]:
                moments.append(float(x.pow(2).mean()))
    return moments


def test_normalized_mlp_preserves_the_second_moment():
    torch.manual_seed(0)
    mlp = MLP(64, [64] * 4, 64, normalized=True)
    x = torch.randn(4096, 64, dtype=torch.float64)
    moments = second_moments(mlp.double(), x)
    assert len(moments) == 5
    assert all(0.5 < m < 2.0 for m in moments), moments
    # PyTorch's default init (variance 1/(3 fan_in)) shrinks them layer by layer
    torch.manual_seed(0)
    default = second_moments(MLP(64, [64] * 4, 64).double(), x)
    assert default[-1] < 1e-3
    assert all(a > b for a, b in zip(default, default[1:], strict=False))


@pytest.mark.parametrize("name", ["silu", "mish", "gelu", "tanh"])
def test_normalized_activation_has_unit_second_moment(name):
    from e3nn.math import normalize2mom

    normalized = NormalizedActivation(name)
    expected = normalize2mom(activation(name)).cst
    assert normalized.scale == pytest.approx(expected, rel=1e-12)
    assert normalized.scale == second_moment_scale(name)  # cached per name
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(200_000, generator=generator, dtype=torch.float64)
    assert float(normalized(z).pow(2).mean()) == pytest.approx(1.0, abs=0.01)


def test_normalized_mlp_structure_and_init():
    torch.manual_seed(0)
    mlp = MLP(48, [256, 256], 300, normalized=True, nonlinearity="tanh", bias=True)
    assert [type(m) for m in mlp] == [
        nn.Linear,
        NormalizedActivation,
        nn.Linear,
        NormalizedActivation,
        nn.Linear,
    ]
    activations = [m.activation for m in mlp if isinstance(m, NormalizedActivation)]
    assert all(type(a) is nn.Tanh for a in activations)
    for linear in (m for m in mlp if isinstance(m, nn.Linear)):
        fan_in = linear.in_features
        bound = math.sqrt(3.0 / fan_in)
        assert linear.weight.abs().max() <= bound
        assert float(linear.weight.detach().std()) == pytest.approx(
            fan_in**-0.5, rel=0.05
        )
        assert torch.all(linear.bias == 0)
    # no nonlinearity: plain identities, nothing to scale
    linear_only = MLP(3, [5], 2, nonlinearity=None, normalized=True)
    assert [type(m) for m in linear_only] == [nn.Linear, nn.Identity, nn.Linear]
    with pytest.raises(ValueError, match="relu6"):
        MLP(3, [5], nonlinearity="relu6", normalized=True)


def test_normalized_init_of_a_lone_linear():
    torch.manual_seed(0)
    linear = normalized_init_(nn.Linear(400, 300, bias=False))
    assert float(linear.weight.detach().std()) == pytest.approx(400**-0.5, rel=0.05)
    one_hot = normalized_init_(nn.Linear(3, 1000, bias=False), fan_in=1)
    assert float(one_hot.weight.detach().std()) == pytest.approx(1.0, rel=0.05)
    scaled = normalized_init_(nn.Linear(400, 300, bias=False), gain=0.1)
    assert scaled.weight.abs().max() <= 0.1 * math.sqrt(3.0 / 400)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalized_mlp_scripts(dtype):
    """Both plain TorchScript and e3nn's script (what `compile_model` uses)."""
    from e3nn.util.jit import script

    torch.manual_seed(0)
    mlp = MLP(4, [8, 8], 3, normalized=True).to(dtype)
    x = torch.randn(5, 4, dtype=dtype)
    torch.testing.assert_close(torch.jit.script(mlp)(x), mlp(x))
    torch.testing.assert_close(script(mlp)(x), mlp(x))


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
