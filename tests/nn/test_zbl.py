"""ZBL screened nuclear repulsion: a hand-computed value, units, shape of the curve,
and its switch-off at the covalent-radius sum."""

import numpy as np
import pytest
import torch

from pes_calc.nn.zbl import ZBL

CU, AG = 0, 1
R_CU, R_AG = 1.32, 1.45  # ASE covalent radii, Å


def zbl_by_hand(
    r: float, z_i: int, z_j: int, r_c: float, k: float = 14.3996454784
) -> float:
    """E = k Z_i Z_j / r φ(r/a) u(r/r_c), straight from the module docstring."""
    a = 0.46850 / (z_i**0.23 + z_j**0.23)
    c = np.array([0.18175, 0.50986, 0.28022, 0.02817])
    d = np.array([3.19980, 0.94229, 0.40290, 0.20162])
    phi = np.sum(c * np.exp(-d * r / a))
    x, p = r / r_c, 6.0
    u = (
        1
        - (p + 1) * (p + 2) / 2 * x**p
        + p * (p + 2) * x ** (p + 1)
        - p * (p + 1) / 2 * x ** (p + 2)
    )
    return k * z_i * z_j / r * phi * u


def pair(zbl: ZBL, lengths, species_i: int = CU, species_j: int = CU) -> torch.Tensor:
    lengths = torch.as_tensor(lengths, dtype=torch.float64).reshape(-1)
    si = torch.full(lengths.shape, species_i, dtype=torch.int64)
    sj = torch.full(lengths.shape, species_j, dtype=torch.int64)
    return zbl(lengths, si, sj)


@pytest.fixture(scope="module")
def zbl():
    return ZBL(["Cu", "Ag"], cutoff=5.0, units="metal")


def test_cu_cu_at_one_angstrom(zbl):
    expected = zbl_by_hand(1.0, 29, 29, 2 * R_CU)
    assert expected == pytest.approx(129.9, abs=0.1)  # eV, worked out on paper
    assert float(pair(zbl, 1.0)) == pytest.approx(expected, rel=1e-9)


def test_cu_ag_both_orders(zbl):
    expected = zbl_by_hand(1.3, 29, 47, R_CU + R_AG)
    assert float(pair(zbl, 1.3, CU, AG)) == pytest.approx(expected, rel=1e-9)
    assert float(pair(zbl, 1.3, AG, CU)) == pytest.approx(expected, rel=1e-9)
    assert float(pair(zbl, 1.3, AG, AG)) == pytest.approx(
        zbl_by_hand(1.3, 47, 47, 2 * R_AG), rel=1e-9
    )


def test_real_units_ratio(zbl):
    real = ZBL(["Cu", "Ag"], cutoff=5.0, units="real")
    r = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    ratio = pair(real, r) / pair(zbl, r)
    torch.testing.assert_close(
        ratio,
        torch.full((3,), 332.06371 / 14.399645, dtype=torch.float64),
        rtol=1e-6,
        atol=0,
    )


def test_unknown_units():
    with pytest.raises(ValueError, match="units"):
        ZBL(["Cu"], cutoff=5.0, units="hartree")


def test_repulsive_at_short_range(zbl):
    r = torch.linspace(
        0.2, 2 * R_CU - 1e-3, 200, dtype=torch.float64, requires_grad=True
    )
    energies = pair(zbl, r)
    assert torch.all(energies > 0)
    assert torch.all(torch.diff(energies) < 0)
    (slope,) = torch.autograd.grad(energies.sum(), r)
    assert torch.all(slope < 0)
    assert float(energies[0]) > 1e3  # strongly repulsive at 0.2 Å


@pytest.mark.parametrize(
    "si, sj, r_c", [(CU, CU, 2 * R_CU), (CU, AG, R_CU + R_AG), (AG, AG, 2 * R_AG)]
)
def test_zero_at_and_beyond_the_covalent_radius_sum(zbl, si, sj, r_c):
    r = torch.tensor([r_c, r_c + 1e-9, r_c + 0.1, 4.9, 10.0], dtype=torch.float64)
    assert torch.equal(pair(zbl, r, si, sj), torch.zeros(5, dtype=torch.float64))
    assert float(pair(zbl, r_c - 0.2, si, sj)) > 0
    # and it reaches zero smoothly: the force vanishes there too
    x = torch.tensor([r_c - 1e-6], dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(pair(zbl, x, si, sj).sum(), x)
    assert abs(float(slope)) < 1e-8


def test_switch_off_never_beyond_the_model_cutoff():
    short = ZBL(["Cu"], cutoff=2.0)
    assert float(pair(short, 1.9)) > 0
    assert torch.equal(pair(short, [2.0, 2.3]), torch.zeros(2, dtype=torch.float64))
    assert float(pair(short, 1.0)) == pytest.approx(
        zbl_by_hand(1.0, 29, 29, 2.0), rel=1e-9
    )


def test_float32(zbl):
    lengths = torch.tensor([1.0, 2.0], dtype=torch.float32)
    species = torch.zeros(2, dtype=torch.int64)
    energies = zbl(lengths, species, species)
    assert energies.dtype == torch.float32
    expected = [zbl_by_hand(1.0, 29, 29, 2 * R_CU), zbl_by_hand(2.0, 29, 29, 2 * R_CU)]
    np.testing.assert_allclose(energies.numpy(), expected, rtol=1e-5)
