"""gathered_matvec and scattered_outer against their plain gather/scatter forms."""

import pytest
import torch

from pes_calc.nn import gather
from pes_calc.nn.gather import gathered_matvec, scattered_outer


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 7 edges, so that 30 edges end in a partial chunk."""
    monkeypatch.setattr(gather, "EDGE_CHUNK", 7)


def _inputs(num_edges: int = 30, num_rows: int = 5, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.randn(
            *shape, generator=generator, dtype=torch.float64
        ).requires_grad_()

    vectors, right = normal(num_edges, 3, 4), normal(num_edges, 3, 6)
    matrices = normal(num_rows, 3, 4, 6)
    index = torch.randint(0, num_rows, (num_edges,), generator=generator)
    return vectors, right, matrices, index


def test_gathered_matvec_is_the_gather_and_matmul_with_its_gradients():
    vectors, _, matrices, index = _inputs()
    expected = (vectors.unsqueeze(-2) @ matrices.index_select(0, index)).squeeze(-2)
    result = gathered_matvec(vectors, matrices, index)
    torch.testing.assert_close(result, expected, rtol=1e-14, atol=1e-14)
    probe = torch.randn_like(expected)
    got = torch.autograd.grad((result * probe).sum(), (vectors, matrices))
    want = torch.autograd.grad((expected * probe).sum(), (vectors, matrices))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-13, atol=1e-13)


def test_scattered_outer_is_the_outer_product_summed_per_row():
    vectors, right, matrices, index = _inputs()
    outer = vectors.unsqueeze(-1) * right.unsqueeze(-2)
    expected = torch.zeros_like(matrices).index_add(0, index, outer)
    result = scattered_outer(vectors, right, index, matrices.shape[0])
    torch.testing.assert_close(result, expected, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("operator", ["matvec", "outer"])
def test_first_and_second_derivatives_against_finite_differences(operator):
    """Second derivatives too: training differentiates the forces."""
    vectors, right, matrices, index = _inputs(num_edges=9, num_rows=3)
    if operator == "matvec":
        inputs, function = (
            (vectors, matrices),
            lambda v, m: gathered_matvec(v, m, index),
        )
    else:
        inputs, function = (
            (vectors, right),
            lambda v, r: scattered_outer(v, r, index, 3),
        )
    assert torch.autograd.gradcheck(function, inputs)
    assert torch.autograd.gradgradcheck(function, inputs)


def test_no_edges():
    vectors, right, matrices, index = _inputs(num_edges=0)
    assert gathered_matvec(vectors, matrices, index).shape == (0, 3, 6)
    assert torch.count_nonzero(scattered_outer(vectors, right, index, 5)) == 0


def test_operator_checks_of_torch_library():
    vectors, right, matrices, index = _inputs(num_edges=9)
    torch.library.opcheck(gathered_matvec, (vectors, matrices, index))
    torch.library.opcheck(scattered_outer, (vectors, right, index, 5))


def test_torchscript_calls_them_with_their_derivatives():
    vectors, _, matrices, index = _inputs()

    @torch.jit.script
    def scripted(v: torch.Tensor, m: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return torch.ops.pes_calc.gathered_matvec(v, m, i)

    result = scripted(vectors, matrices, index)
    torch.testing.assert_close(result, gathered_matvec(vectors, matrices, index))
    grads = torch.autograd.grad(result.sum(), (vectors, matrices))
    expected = torch.autograd.grad(
        gathered_matvec(vectors, matrices, index).sum(), (vectors, matrices)
    )
    for g, w in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, w)
