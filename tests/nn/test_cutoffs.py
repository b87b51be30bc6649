"""Smooth cutoff functions: values at the ends, the middle, and smooth derivatives."""

import math

import pytest
import torch

from pes_calc.nn.cutoffs import polynomial_envelope, shifted_cosine_cutoff

CUTOFF, WIDTH = 5.0, 0.5
ONSET = CUTOFF - WIDTH


def derivative(function, r: float, order: int = 1) -> float:
    """d^order f / dr^order at r, by autograd in float64."""
    x = torch.tensor([r], dtype=torch.float64, requires_grad=True)
    y = function(x)
    for _ in range(order):
        (y,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    return float(y)


def cosine(r):
    return shifted_cosine_cutoff(r, CUTOFF, WIDTH)


def envelope(r):
    return polynomial_envelope(r, CUTOFF)


# ------------------------------------------------------------ shifted cosine


def test_shifted_cosine_values():
    r = torch.tensor([0.0, 1.0, 4.0, ONSET, CUTOFF, 5.2, 50.0], dtype=torch.float64)
    expected = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    assert torch.equal(cosine(r), expected)


def test_shifted_cosine_switching_width():
    r = torch.tensor([ONSET + WIDTH / 2, ONSET + WIDTH / 4], dtype=torch.float64)
    expected = torch.tensor(
        [0.5, 0.5 * (1 + math.cos(math.pi / 4))], dtype=torch.float64
    )
    torch.testing.assert_close(cosine(r), expected, rtol=0, atol=1e-15)
    # monotonic decrease across the width
    grid = torch.linspace(ONSET, CUTOFF, 51, dtype=torch.float64)
    assert torch.all(torch.diff(cosine(grid)) < 0)


def test_shifted_cosine_gradcheck():
    r = torch.tensor(
        [3.0, 4.4, 4.51, 4.6, 4.75, 4.9, 4.99, 5.1],
        dtype=torch.float64,
        requires_grad=True,
    )
    assert torch.autograd.gradcheck(cosine, (r,))


def test_shifted_cosine_derivative_is_continuous():
    # f' = -π/(2w) sin(π (r - onset)/w): zero at both ends, -π/(2w) in the middle
    for r in (ONSET, CUTOFF):
        for side in (-1e-9, 1e-9):
            assert abs(derivative(cosine, r + side)) < 1e-7
    assert derivative(cosine, ONSET + WIDTH / 2) == pytest.approx(
        -math.pi / (2 * WIDTH)
    )
    assert derivative(cosine, 3.0) == 0.0
    assert derivative(cosine, 6.0) == 0.0


# ------------------------------------------------------------ polynomial envelope


def klicpera(x: float, p: float = 6.0) -> float:
    return (
        1
        - (p + 1) * (p + 2) / 2 * x**p
        + p * (p + 2) * x ** (p + 1)
        - p * (p + 1) / 2 * x ** (p + 2)
    )


def test_polynomial_envelope_values():
    r = torch.tensor([0.0, 1.0, 2.5, 4.0, CUTOFF, 5.5, 100.0], dtype=torch.float64)
    values = envelope(r)
    assert values[0] == 1.0
    for i in (1, 2, 3):
        assert float(values[i]) == pytest.approx(
            klicpera(float(r[i]) / CUTOFF), abs=1e-14
        )
    assert 0.0 < float(values[3]) < float(values[2]) < float(values[1]) < 1.0
    assert torch.equal(values[4:], torch.zeros(3, dtype=torch.float64))


def test_polynomial_envelope_smooth_at_the_cutoff():
    # u has a triple root at the cutoff: value, first and second derivative vanish
    for order in (1, 2):
        assert abs(derivative(envelope, CUTOFF - 1e-8, order)) < 1e-6
        assert derivative(envelope, CUTOFF + 1e-8, order) == 0.0
    # (u'' vanishes linearly: 6 Q(1) (1 - r/r_c) / r_c^2 just inside, Q(1) = 56)
    assert derivative(envelope, CUTOFF - 1e-3, 2) == pytest.approx(
        6 * 56 * 2e-4 / 25, rel=1e-2
    )
    # ... but not the third (u = (1-x)^3 (1 + 3x + 6x^2 + 10x^3 + 15x^4 + 21x^5))
    assert derivative(envelope, CUTOFF - 1e-6, 3) == pytest.approx(
        -6 * 56 / CUTOFF**3, rel=1e-4
    )
    # and it is flat at the origin
    assert derivative(envelope, 1e-3) == pytest.approx(0.0, abs=1e-12)


def test_polynomial_envelope_gradcheck():
    r = torch.tensor([0.5, 2.0, 3.7, 4.9, 5.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(envelope, (r,))
