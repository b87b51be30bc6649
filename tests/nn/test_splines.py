"""Cubic Hermite splines with their derivative, against torch-spex and autograd."""

import torch
from spex.radial import LaplacianEigenstates

from pes_calc.nn.cutoffs import shifted_cosine_cutoff, shifted_cosine_cutoff_slope
from pes_calc.nn.precision import float64_construction
from pes_calc.nn.splines import first_order, hermite_spline


def test_values_and_slopes_are_torch_spex_and_its_autograd():
    with float64_construction():
        spliner = LaplacianEigenstates(cutoff=4.0, max_angular=3, max_radial=3).spliner
    # inside, at the table's knots, and beyond the cutoff (clipped: slope 0)
    r = torch.cat([torch.linspace(0.0, 4.0, 401), torch.tensor([4.5, 9.0])])
    r = r.double().requires_grad_()
    reference = spliner(r)
    slopes = torch.stack(
        [
            torch.autograd.grad(reference[:, n].sum(), r, retain_graph=True)[0]
            for n in range(reference.shape[1])
        ],
        dim=1,
    )
    value, slope = hermite_spline(
        r.detach(),
        spliner.spline_spacing,
        spliner.spline_values,
        spliner.spline_derivatives,
        4.0,
    )
    assert torch.allclose(value, reference, atol=1e-14, rtol=0)
    assert torch.allclose(slope, slopes, atol=1e-11, rtol=0)
    assert slope[-2:].abs().max() == 0.0


def test_cutoff_slope_is_the_derivative():
    r = torch.linspace(3.0, 5.5, 251, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(shifted_cosine_cutoff(r, 5.0, 0.7).sum(), r)
    assert torch.allclose(shifted_cosine_cutoff_slope(r, 5.0, 0.7), grad, atol=1e-14)


def test_first_order_has_the_value_and_the_given_gradient():
    r = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    value = torch.tensor([[3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)
    slope = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float64)
    out = first_order(value, slope, r)
    assert torch.equal(out, value)
    (grad,) = torch.autograd.grad(out.sum(), r)
    assert grad.tolist() == [-0.5, 2.25]
