"""EdgeTensorProduct against e3nn's TensorProduct followed by a scatter-sum."""

import pytest
import torch
from e3nn import o3

from pes_calc.architectures.nequip import Interaction, hidden_irreps
from pes_calc.nn import tensor_product
from pes_calc.nn.precision import float64_construction
from pes_calc.nn.scatter import scatter_sum
from pes_calc.nn.tensor_product import EdgeTensorProduct


def _nequip_tensor_product(
    irreps_in: o3.Irreps, l_max: int, parity: bool
) -> o3.TensorProduct:
    sh = o3.Irreps.spherical_harmonics(l_max)
    layer = Interaction(
        irreps_in, sh, hidden_irreps(3, l_max, parity), 2, 4, 1, 4, True
    )
    return layer.tensor_product


def _inputs(tp: o3.TensorProduct, num_nodes: int, num_edges: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(
        num_nodes, tp.irreps_in1.dim, generator=generator, dtype=torch.float64
    )
    vectors = torch.randn(num_edges, 3, generator=generator, dtype=torch.float64)
    harmonics = o3.spherical_harmonics(tp.irreps_in2, vectors, normalize=True)
    weights = torch.randn(
        num_edges, tp.weight_numel, generator=generator, dtype=torch.float64
    )
    edge_index = torch.randint(0, num_nodes, (2, num_edges), generator=generator)
    return features, harmonics, weights, edge_index


def _assert_same_values_and_gradients(result, expected, inputs):
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)
    # gradients too: forces come from the backward pass
    probe = torch.randn_like(expected)
    grads = torch.autograd.grad((result * probe).sum(), inputs, retain_graph=True)
    expected_grads = torch.autograd.grad((expected * probe).sum(), inputs)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "irreps_in, l_max, parity",
    [
        ("3x0e", 2, True),  # NequIP's first layer: scalars only
        ("3x0e+3x1o", 1, True),
        ("3x0e+3x0o+3x1e+3x1o+3x2e+3x2o", 2, True),
        ("3x0e+3x1o+3x2e", 2, False),
        ("3x0e+3x1o+3x2e+3x3o", 3, True),
    ],
)
def test_matches_e3nn_tensor_product_and_scatter(irreps_in, l_max, parity):
    with float64_construction():  # exact Clebsch-Gordan coefficients in both
        tp = _nequip_tensor_product(o3.Irreps(irreps_in), l_max, parity)
        convolution = EdgeTensorProduct(tp)
    features, harmonics, weights, edge_index = _inputs(tp, num_nodes=6, num_edges=25)
    inputs = [t.requires_grad_(True) for t in (features, harmonics, weights)]

    expected = scatter_sum(
        tp(features[edge_index[1]], harmonics, weights), edge_index[0], 6
    )
    result = convolution(features, harmonics, weights, edge_index)
    assert result.shape == expected.shape == (6, tp.irreps_out.dim)
    assert expected.abs().max() > 0.5
    _assert_same_values_and_gradients(result, expected, inputs)


@pytest.mark.parametrize("edge_chunk", [None, 1, 7, 1000])
def test_edge_chunks_do_not_change_the_result(edge_chunk):
    """None: all edges at once with plain autograd (what prepare_for_export selects)."""
    with float64_construction():
        tp = _nequip_tensor_product(o3.Irreps("3x0e+3x1o+3x2e"), 2, True)
        convolution = EdgeTensorProduct(tp)
    features, harmonics, weights, edge_index = _inputs(tp, num_nodes=6, num_edges=25)
    inputs = [t.requires_grad_(True) for t in (features, harmonics, weights)]
    expected = scatter_sum(
        tp(features[edge_index[1]], harmonics, weights), edge_index[0], 6
    )
    if edge_chunk is None:
        convolution.prepare_for_export()
    else:
        convolution.edge_chunk = edge_chunk
    result = convolution(features, harmonics, weights, edge_index)
    _assert_same_values_and_gradients(result, expected, inputs)


def test_second_derivatives_for_training_on_forces():
    """Training differentiates the forces: the chunked operator's backward pass
    recomputes under create_graph, which records it (gradgradcheck: finite
    differences)."""
    with float64_construction():
        tp = _nequip_tensor_product(o3.Irreps("2x0e+2x1o"), 1, True)
        convolution = EdgeTensorProduct(tp)
    convolution.edge_chunk = 4
    features, harmonics, weights, edge_index = _inputs(tp, num_nodes=3, num_edges=11)
    inputs = tuple(t.requires_grad_(True) for t in (features, harmonics, weights))

    def function(*args):
        return convolution(*args, edge_index)

    assert torch.autograd.gradcheck(function, inputs)
    assert torch.autograd.gradgradcheck(function, inputs)


def test_operator_checks_of_torch_library():
    with float64_construction():
        tp = _nequip_tensor_product(o3.Irreps("2x0e+2x1o"), 1, True)
        convolution = EdgeTensorProduct(tp)
    features, harmonics, weights, edge_index = _inputs(tp, num_nodes=3, num_edges=9)
    block = convolution.blocks[1]  # the 2x1o input
    path_weights = weights.reshape(9, -1, block.mul)[:, : block.num_paths]
    args = (
        features[:, 2:]
        .reshape(3, block.mul, 3)
        .transpose(1, 2)
        .contiguous()
        .requires_grad_(),
        harmonics.requires_grad_(),
        path_weights.contiguous().requires_grad_(),
        edge_index[0],
        edge_index[1],
        block.coupling,
        block.group_paths,
        block.group_dims,
        4,
    )
    torch.library.opcheck(tensor_product.edge_paths, args)


def test_no_edges_gives_zeros():
    tp = _nequip_tensor_product(o3.Irreps("3x0e+3x1o"), 1, True)
    convolution = EdgeTensorProduct(tp)
    features, harmonics, weights, edge_index = _inputs(tp, num_nodes=4, num_edges=0)
    result = convolution(
        features.float(), harmonics.float(), weights.float(), edge_index
    )
    assert result.shape == (4, tp.irreps_out.dim)
    assert not result.any()


def test_torchscript_matches_eager():
    tp = _nequip_tensor_product(o3.Irreps("3x0e+3x1o+3x2e"), 2, False)
    convolution = EdgeTensorProduct(tp)
    scripted = torch.jit.script(convolution)
    features, harmonics, weights, edge_index = _inputs(tp, num_nodes=5, num_edges=20)
    args = (features.float(), harmonics.float(), weights.float(), edge_index)
    torch.testing.assert_close(scripted(*args), convolution(*args))


@pytest.mark.parametrize(
    "tp, message",
    [
        (
            o3.FullyConnectedTensorProduct("2x0e+2x1o", "1x0e+1x1o", "2x0e+2x1o"),
            "'uvu'",
        ),
        (
            o3.TensorProduct(
                "2x0e",
                "2x1o",
                "2x1o",
                [(0, 0, 0, "uvu", True)],
                internal_weights=False,
                shared_weights=False,
            ),
            "multiplicity 1",
        ),
    ],
)
def test_unsupported_tensor_products_are_refused(tp, message):
    with pytest.raises(ValueError, match=message):
        EdgeTensorProduct(tp)
