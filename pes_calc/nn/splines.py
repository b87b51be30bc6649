"""Cubic Hermite splines (torch-spex's radial tables) with their derivative, and a
first-order form whose backward pass reads only that derivative.

torch-spex evaluates R(r) = h00(t) p_k + h10(t) Δ m_k + h01(t) p_{k+1}
+ h11(t) Δ m_{k+1} (t = r/Δ - k, tables p of values and m of derivatives) with
autograd, which keeps four gathered (E, n) tables and the polynomials for the
backward pass. Its derivative is the same sum over dh/dt / Δ; computed in the
forward pass, it is all the backward pass needs (`first_order`).
"""

from typing import Tuple

import torch
from torch import Tensor


def hermite_spline(
    r: Tensor, spacing: Tensor, values: Tensor, derivatives: Tensor, cutoff: float
) -> Tuple[Tensor, Tensor]:
    """(E, n) spline values and their derivatives d/dr (per Å) at lengths r (E,), Å,
    clipped to [0, cutoff] as torch-spex does (derivative 0 outside)."""
    x = torch.clamp(r, 0.0, cutoff)
    inside = ((r >= 0.0) & (r <= cutoff)).to(r.dtype).unsqueeze(-1)
    k = torch.floor(x / spacing).to(torch.long)
    t = ((x - k * spacing) / spacing).unsqueeze(-1)
    t2 = t * t
    t3 = t2 * t
    p0 = values.index_select(0, k)
    p1 = values.index_select(0, k + 1)
    m0 = derivatives.index_select(0, k) * spacing
    m1 = derivatives.index_select(0, k + 1) * spacing
    value = (
        (2.0 * t3 - 3.0 * t2 + 1.0) * p0
        + (t3 - 2.0 * t2 + t) * m0
        + (3.0 * t2 - 2.0 * t3) * p1
        + (t3 - t2) * m1
    )
    slope = (
        (6.0 * t2 - 6.0 * t) * (p0 - p1)
        + (3.0 * t2 - 4.0 * t + 1.0) * m0
        + (3.0 * t2 - 2.0 * t) * m1
    ) / spacing
    return value, slope * inside


def first_order(value: Tensor, slope: Tensor, r: Tensor) -> Tensor:
    """``value`` (E, n) as a function of r (E,) whose gradient is ``slope``: exact
    first derivatives (forces, stress, and their parameter gradients), but no
    second derivatives in r."""
    return value.detach() + (r - r.detach()).unsqueeze(-1) * slope.detach()
