"""Long-range electrostatics: the Madelung energy of rock salt, Ewald = PME = direct
sum, the kernel, neutralisation, slabs and unsupported periodicities, TorchScript."""

import math

import ase
import ase.build
import numpy as np
import pytest
import torch
from scipy.special import erf

from pes_calc.graph import batch_graphs, edge_vectors
from pes_calc.neighbors import atoms_to_graph
from pes_calc.nn.long_range import (
    COULOMB_CONSTANT,
    LongRangeElectrostatics,
    neutralise,
    transfer_charges,
)

K = 14.399645478425668  # e²/(4πε₀), eV·Å
NACL_MADELUNG = 1.747564594633182
METHODS = pytest.mark.parametrize("use_ewald", [True, False], ids=["ewald", "pme"])


def energies(module, atoms, charges, cutoff=5.0):
    """(N,) per-atom energies of ``charges`` on ``atoms`` with a ``cutoff`` graph."""
    graph = atoms_to_graph(atoms, ["Na", "Cl"], cutoff)
    lengths = torch.linalg.vector_norm(edge_vectors(graph), dim=-1)
    return module(torch.as_tensor(charges, dtype=torch.float64), graph, lengths)


def module(**kwargs):
    return LongRangeElectrostatics(**kwargs).double()


def cluster_charges(seed=0):
    """Six random charges (neutral) spread over a few Å."""
    rng = np.random.default_rng(seed)
    positions = rng.uniform(-3.0, 3.0, size=(6, 3))
    charges = rng.normal(size=6)
    return positions, charges - charges.mean()


def test_units_are_ev_angstrom():
    assert pytest.approx(K, rel=1e-12) == COULOMB_CONSTANT


@METHODS
def test_rock_salt_madelung_energy(use_ewald):
    """Bare Coulomb (no exclusion), real space over a 10 Å graph: the conventional
    NaCl cell holds 4 ion pairs of energy -M k / r0."""
    atoms = ase.build.bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    charges = np.where(atoms.numbers == 11, 1.0, -1.0)
    energy = energies(module(use_ewald=use_ewald), atoms, charges, cutoff=10.0).sum()
    expected = -4 * NACL_MADELUNG * K / 2.82
    # measured: Ewald 2.5e-6 (k-space truncation at 1.33 Å), PME 1e-12 (symmetric sites)
    assert float(energy) == pytest.approx(expected, rel=1e-5)


def test_kernel_is_coulomb_beyond_the_exclusion_radius():
    lr = module(exclusion_radius=5.0)
    r = torch.tensor([5.0, 6.0, 8.0, 12.0], dtype=torch.float64)
    kernel = lr.pair_kernel(r).numpy()
    # Coulomb to erfc(r/√2σ): 3.5e-4 at 5 Å, 1e-8 at 8 Å
    np.testing.assert_allclose(kernel, K / r.numpy(), rtol=4e-4)
    np.testing.assert_allclose(
        kernel, K * erf(r.numpy() / (1.4 * math.sqrt(2))) / r.numpy(), rtol=1e-12
    )
    # switched off smoothly inside: value and slope go to zero at r → 0
    inner = lr.pair_kernel(torch.tensor([1e-3, 0.5], dtype=torch.float64))
    assert float(inner[0]) < 1e-5 and 0 < float(inner[1]) < 0.1 * K / 0.5
    # continuous slope at the exclusion radius
    edge = torch.tensor([5.0 - 1e-6, 5.0 + 1e-6], dtype=torch.float64)
    edge.requires_grad_(True)
    (slopes,) = torch.autograd.grad(lr.pair_kernel(edge).sum(), edge)
    assert float(abs(slopes[0] - slopes[1])) < 1e-5


def test_exclusion_degree_keeps_the_switch_closed_longer():
    """v(r) = k erf(r/√2σ)/r ((1 - cos πr/r_x)/2)^n inside r_x, Coulomb beyond."""
    r = np.array([1.0, 2.5, 4.0, 4.9, 6.0])
    coulomb = K * erf(r / (1.4 * math.sqrt(2))) / r
    inside = np.where(r < 5.0, (1 - np.cos(np.pi * r / 5.0)) / 2, 1.0)
    for n in (1, 4, 8):
        lr = module(exclusion_radius=5.0, exclusion_degree=n)
        kernel = lr.pair_kernel(torch.as_tensor(r)).numpy()
        np.testing.assert_allclose(kernel, coulomb * inside**n, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="exclusion_degree"):
        module(exclusion_degree=0)


def test_direct_sum_of_two_charges_by_hand():
    """+q and -q 8 Å apart in vacuum: E = -k q² erf(r/√2σ) / r."""
    atoms = ase.Atoms("NaCl", positions=[[0, 0, 0], [0, 0, 8.0]])
    energy = energies(module(exclusion_radius=5.0), atoms, [0.7, -0.7]).sum()
    expected = -K * 0.49 * erf(8.0 / (1.4 * math.sqrt(2))) / 8.0
    assert float(energy) == pytest.approx(expected, rel=1e-12)


@METHODS
def test_periodic_box_matches_vacuum(use_ewald):
    """A neutral cluster in a 40 Å box (Ewald, PME) equals the same cluster in vacuum
    (direct sum) plus the tin-foil term of the periodic dipoles, -2πk M²/(3V), to the
    quadrupole images (~2e-4 eV, measured to fall as L⁻⁵). A fine k-space: metatrain's
    default 1.33 Å is ~1e-3 eV off here (Ewald keeps |k| < π/1.33 Å⁻¹)."""
    positions, charges = cluster_charges()
    box = ase.Atoms("Na6", positions=positions + 20.0, cell=np.eye(3) * 40.0, pbc=True)
    vacuum = ase.Atoms("Na6", positions=positions)
    lr = module(use_ewald=use_ewald, exclusion_radius=5.0, kspace_resolution=0.5)
    periodic = float(energies(lr, box, charges).sum())
    direct = float(energies(lr, vacuum, charges).sum())
    dipole = charges @ positions
    tinfoil = -2 * math.pi * K * dipole @ dipole / (3 * 40.0**3)
    assert abs(direct) > 1.0  # charges interact beyond the exclusion radius
    assert abs(tinfoil) > 1e-3
    assert periodic == pytest.approx(direct + tinfoil, abs=3e-4)


def test_ewald_and_pme_agree_on_a_small_triclinic_cell():
    atoms = ase.build.bulk("NaCl", "rocksalt", a=5.64) * (2, 1, 1)
    atoms.cell = atoms.cell.array + [[0.3, 0.1, 0.0], [0.0, 0.2, -0.3], [0.1, 0.0, 0.4]]
    atoms.rattle(0.2, seed=1)
    charges = np.random.default_rng(2).normal(size=len(atoms))
    ewald = energies(module(use_ewald=True, exclusion_radius=5.0), atoms, charges)
    pme = energies(module(use_ewald=False, exclusion_radius=5.0), atoms, charges)
    assert float(ewald.abs().max()) > 0.05
    scale = float(ewald.abs().max())
    np.testing.assert_allclose(pme.numpy(), ewald.numpy(), atol=2e-4 * scale)


def test_neutralise_per_structure():
    graphs = [
        atoms_to_graph(ase.Atoms("Na3", positions=np.eye(3) * 3), ["Na"], 5.0),
        atoms_to_graph(ase.Atoms("Na2", positions=np.eye(2, 3) * 3), ["Na"], 5.0),
    ]
    graph = batch_graphs(graphs)
    charges = torch.tensor([1.0, 2.0, 6.0, -1.0, 0.0], dtype=torch.float64)
    neutral = neutralise(charges, graph)
    torch.testing.assert_close(
        neutral, torch.tensor([-2.0, -1.0, 3.0, -0.5, 0.5], dtype=torch.float64)
    )


@METHODS
def test_a_net_charge_is_removed(use_ewald):
    """Shifting every latent charge by a constant changes nothing, periodic or not."""
    positions, charges = cluster_charges(seed=3)
    for atoms in (
        ase.Atoms("Na6", positions=positions + 6.0, cell=np.eye(3) * 12.0, pbc=True),
        ase.Atoms("Na6", positions=positions),
    ):
        lr = module(use_ewald=use_ewald, exclusion_radius=5.0)
        reference = energies(lr, atoms, charges)
        shifted = energies(lr, atoms, charges + 0.8)
        torch.testing.assert_close(shifted, reference, rtol=1e-10, atol=1e-12)


def transfers(atoms, latent, radius=2.0, cutoff=5.0):
    graph = atoms_to_graph(atoms, ["H", "O", "Na", "Cl"], cutoff)
    lengths = torch.linalg.vector_norm(edge_vectors(graph), dim=-1)
    latent = torch.as_tensor(latent, dtype=torch.float64)
    return transfer_charges(latent, graph, lengths, radius), graph


def water_pair(distance: float) -> ase.Atoms:
    water = ase.build.molecule("H2O")
    other = water.copy()
    other.positions += [0.0, 0.0, distance]
    return water + other


def test_charge_transfers_are_neutral_per_molecule():
    """Two waters 4 Å apart in one structure (and in a periodic box): with a 2 Å
    transfer radius each molecule is neutral on its own, whatever the latent values;
    a lone atom gets no charge."""
    latent = np.random.default_rng(0).normal(size=7)
    for atoms in (water_pair(4.0) + ase.Atoms("Na", positions=[[6.0, 0, 0]]),):
        for cell in (None, np.eye(3) * 9.0):
            if cell is not None:
                atoms = atoms.copy()
                atoms.cell, atoms.pbc = cell, True
            q, _ = transfers(atoms, latent)
            assert float(q[:3].sum()) == pytest.approx(0.0, abs=1e-14)
            assert float(q[3:6].sum()) == pytest.approx(0.0, abs=1e-14)
            assert float(q[6]) == 0.0
            assert float(q.abs().max()) > 0.1
    # a constant shift of the latent values (an electronegativity offset) is no charge
    shifted, _ = transfers(water_pair(4.0), latent[:6] + 3.0)
    torch.testing.assert_close(shifted, transfers(water_pair(4.0), latent[:6])[0])


def test_charge_transfers_follow_the_switch_by_hand():
    """Two atoms: q_0 = s(r)(χ_1 - χ_0) with the shifted cosine (1 below 1.5 Å, 0 at
    2 Å), so the charge fades continuously as the bond breaks."""
    for r, s in ((1.2, 1.0), (1.75, 0.5), (1.99, 0.5 * (1 + math.cos(math.pi * 0.98)))):
        atoms = ase.Atoms("HO", positions=[[0, 0, 0], [0, 0, r]])
        q, _ = transfers(atoms, [0.3, -0.9])
        assert q.tolist() == pytest.approx([-1.2 * s, 1.2 * s], abs=1e-12)
    q, _ = transfers(ase.Atoms("HO", positions=[[0, 0, 0], [0, 0, 2.01]]), [0.3, -0.9])
    assert q.tolist() == [0.0, 0.0]


@METHODS
def test_transfer_charges_in_the_module(use_ewald):
    """The module with a transfer radius sums the transferred charges; per-structure
    neutralisation would instead let two distant molecules carry net charges."""
    atoms = water_pair(7.0)
    latent = np.random.default_rng(1).normal(size=6)
    q, graph = transfers(atoms, latent)
    lengths = torch.linalg.vector_norm(edge_vectors(graph), dim=-1)
    latent_t = torch.as_tensor(latent)
    plain = module(use_ewald=use_ewald, exclusion_radius=5.0)
    with_transfers = module(
        use_ewald=use_ewald, exclusion_radius=5.0, charge_transfer_radius=2.0
    )
    torch.testing.assert_close(
        with_transfers(latent_t, graph, lengths), plain(q, graph, lengths)
    )
    torch.testing.assert_close(with_transfers.charges(latent_t, graph, lengths), q)
    assert abs(float(neutralise(latent_t, graph)[:3].sum())) > 0.1
    with pytest.raises(ValueError, match="charge_transfer_radius"):
        module(charge_transfer_radius=0.0)


def slab(vacuum: float) -> ase.Atoms:
    """A 2×2 NaCl(100) bilayer with a z dipole (rattled), pbc T T F."""
    atoms = ase.build.bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    atoms = atoms[[a.index for a in atoms if a.position[2] < 1.0]] * (1, 1, 1)
    atoms.positions[atoms.numbers == 11, 2] += 1.2  # Na above Cl: a dipole along z
    atoms.cell[2] = [0, 0, vacuum]
    atoms.pbc = [True, True, False]
    return atoms


@METHODS
def test_slab_energy_does_not_depend_on_the_vacuum(use_ewald):
    """The 2D correction removes the dipole interaction between periodic slab images:
    the energy converges with vacuum, where a 3D sum drifts as 2πk M_z²/V."""
    charges = np.where(slab(20.0).numbers == 11, 0.8, -0.8)
    lr = module(use_ewald=use_ewald, exclusion_radius=5.0)
    slab_energies, bulk_energies = [], []
    for vacuum in (30.0, 45.0):
        atoms = slab(vacuum)
        slab_energies.append(float(energies(lr, atoms, charges).sum()))
        atoms.pbc = True
        bulk_energies.append(float(energies(lr, atoms, charges).sum()))
    assert abs(slab_energies[0] - slab_energies[1]) < 1e-3
    assert abs(bulk_energies[0] - bulk_energies[1]) > 0.05


@pytest.mark.parametrize(
    "pbc, cell, message",
    [
        ([True, False, False], np.eye(3) * 10, "periodic along one direction"),
        ([True, True, False], np.diag([10.0, 10.0, 0.0]), "cell with volume"),
        ([True, True, False], [[10, 0, 0], [0, 10, 0], [0, 3, 10]], "Cartesian axis 2"),
    ],
)
def test_unsupported_periodicity_raises(pbc, cell, message):
    atoms = ase.Atoms("Na2", positions=[[1, 1, 1], [2, 3, 4]], cell=cell, pbc=pbc)
    with pytest.raises(ValueError, match=message):
        energies(module(exclusion_radius=5.0), atoms, [0.5, -0.5])


@METHODS
def test_torchscript_equals_eager_on_a_mixed_batch(use_ewald):
    positions, charges = cluster_charges(seed=4)
    structures = [
        ase.Atoms("Na6", positions=positions + 6.0, cell=np.eye(3) * 12.0, pbc=True),
        ase.Atoms("Na6", positions=positions),
        slab(30.0),
    ]
    graphs = [atoms_to_graph(atoms, ["Na", "Cl"], 5.0) for atoms in structures]
    graph = batch_graphs(graphs)
    all_charges = torch.as_tensor(
        np.concatenate([charges, charges, np.linspace(-1, 1, len(structures[2]))])
    )
    lengths = torch.linalg.vector_norm(edge_vectors(graph), dim=-1)
    lr = module(use_ewald=use_ewald, exclusion_radius=5.0)
    eager = lr(all_charges, graph, lengths)
    scripted = torch.jit.script(lr)(all_charges, graph, lengths)
    torch.testing.assert_close(scripted, eager, rtol=1e-12, atol=1e-14)
    transferring = module(
        use_ewald=use_ewald, exclusion_radius=5.0, charge_transfer_radius=2.5
    )
    transferred = transferring(all_charges, graph, lengths)
    assert float((transferred - eager).abs().max()) > 1e-3
    torch.testing.assert_close(
        torch.jit.script(transferring)(all_charges, graph, lengths),
        transferred,
        rtol=1e-12,
        atol=1e-14,
    )
    # batch = one by one
    split = torch.split(all_charges, [6, 6, len(structures[2])])
    pieces = zip(structures, split, strict=True)
    singles = [energies(lr, atoms, q) for atoms, q in pieces]
    torch.testing.assert_close(eager, torch.cat(singles), rtol=1e-10, atol=1e-12)
