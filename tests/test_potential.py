"""Tests of `pes_calc.potential.Potential`: per-type scales and shifts, ZBL, sums,
forces and stress as derivatives of the energy, batching and switches."""

import ase
import numpy as np
import pytest
import torch
from ase.data import atomic_numbers, covalent_radii
from helpers import bulk

from pes_calc import build_model, keys
from pes_calc.graph import batch_graphs, edge_vectors
from pes_calc.neighbors import atoms_to_graph
from pes_calc.potential import Architecture, Potential

SPECIES = ["Cu", "Ag"]
SOAP = {"max_angular": 2, "max_radial": 2}
BPNN = {"num_hidden_layers": 1, "num_neurons_per_layer": 8}
SMALL_NEQUIP = {"r_max": 4.0, "num_layers": 2, "num_features": 8, "l_max": 1}
SMALL_ALLEGRO = {
    "r_max": 4.0,
    "num_scalar_features": 16,
    "num_tensor_features": 4,
    "l_max": 1,
}
# an untrained model gives small numbers; scale them so that comparisons mean something
SCALES = [20.0, 30.0]
SHIFTS = [-3.5, -1.25]


def _soap(**hypers) -> Potential:
    hypers = {"per_type_energy_scales": SCALES, **hypers}
    return build_model(
        "soap_bpnn",
        SPECIES,
        soap=SOAP,
        bpnn=BPNN,
        model_dtype="float64",
        seed=0,
        **hypers,
    )


def _graph(atoms: ase.Atoms, model: Potential):
    return atoms_to_graph(atoms, model.species, model.cutoff, dtype=torch.float64)


def _outputs(model: Potential, atoms: ase.Atoms, **kwargs) -> dict:
    outputs = model(_graph(atoms, model), **kwargs)
    return {name: value.detach().numpy() for name, value in outputs.items()}


def _energy(model: Potential, atoms: ase.Atoms) -> float:
    graph = _graph(atoms, model)
    return float(model(graph, False, False)[keys.ENERGY].detach()[0])


def _dimer(distance: float, symbols: str = "CuAg") -> ase.Atoms:
    return ase.Atoms(symbols, positions=[[0, 0, 0], [distance, 0, 0]])


def _cluster() -> ase.Atoms:
    """5 atoms of both species, no cell, all within the cutoff of each other."""
    atoms = ase.Atoms(
        "CuAgCuAgCu",
        positions=[[0, 0, 0], [2.5, 0, 0], [0, 2.6, 0], [0, 0, 2.4], [1.6, 1.5, 1.4]],
    )
    atoms.rattle(0.05, seed=7)
    return atoms


def _zbl_by_hand(r: float, a: str, b: str) -> float:
    """E = k Z_a Z_b / r φ(r/s) u(r/r_c), r_c the covalent-radius sum (metal units)."""
    z_a, z_b = atomic_numbers[a], atomic_numbers[b]
    r_c = covalent_radii[z_a] + covalent_radii[z_b]
    s = 0.46850 / (z_a**0.23 + z_b**0.23)
    c = np.array([0.18175, 0.50986, 0.28022, 0.02817])
    d = np.array([3.19980, 0.94229, 0.40290, 0.20162])
    phi = np.sum(c * np.exp(-d * r / s))
    x, p = r / r_c, 6.0
    u = 1 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1)
    u -= p * (p + 1) / 2 * x ** (p + 2)
    return 14.399645478425668 * z_a * z_b / r * phi * (u if x < 1 else 0.0)


@pytest.fixture(scope="module")
def model():
    return _soap()


# ---- per-type scales and shifts ----------------------------------------------------


def test_shifts_add_shift_times_count_and_no_forces(model):
    shifted = _soap(per_type_energy_shifts=SHIFTS)
    atoms = bulk(("Cu", "Ag", "Cu", "Cu"))  # 3 Cu, 1 Ag
    plain, moved = _outputs(model, atoms), _outputs(shifted, atoms)
    expected = 3 * SHIFTS[0] + 1 * SHIFTS[1]
    assert moved[keys.ENERGY][0] - plain[keys.ENERGY][0] == pytest.approx(
        expected, abs=1e-12
    )
    np.testing.assert_allclose(
        moved[keys.ENERGIES] - plain[keys.ENERGIES],
        [SHIFTS[0], SHIFTS[1], SHIFTS[0], SHIFTS[0]],
        atol=1e-12,
    )
    np.testing.assert_allclose(moved[keys.FORCES], plain[keys.FORCES], atol=1e-12)
    np.testing.assert_allclose(moved[keys.STRESS], plain[keys.STRESS], atol=1e-12)
    assert np.abs(plain[keys.FORCES]).max() > 1e-2  # the comparison means something


def test_scales_multiply_per_atom_energies():
    unit = _soap(per_type_energy_scales=1.0)
    scaled = _soap(per_type_energy_scales=[2.0, 5.0])
    atoms = bulk()  # Cu Ag Cu Ag
    ones, twos = _outputs(unit, atoms), _outputs(scaled, atoms)
    factors = np.array([2.0, 5.0, 2.0, 5.0])
    assert np.abs(ones[keys.ENERGIES]).min() > 1e-4
    np.testing.assert_allclose(
        twos[keys.ENERGIES], factors * ones[keys.ENERGIES], rtol=1e-12
    )
    assert twos[keys.ENERGY][0] == pytest.approx(
        np.sum(factors * ones[keys.ENERGIES]), rel=1e-12
    )
    # the features before the scale are the same model's
    np.testing.assert_array_equal(
        twos[keys.LAST_LAYER_FEATURES], ones[keys.LAST_LAYER_FEATURES]
    )


def test_single_scale_is_repeated_per_species():
    model = _soap(per_type_energy_scales=2.5, per_type_energy_shifts=-1.0)
    assert model.per_type_energy_scales.tolist() == [2.5, 2.5]
    assert model.per_type_energy_shifts.tolist() == [-1.0, -1.0]


def test_wrong_number_of_scales_is_an_error():
    with pytest.raises(ValueError, match=r"per_type_energy_scales needs one value or"):
        _soap(per_type_energy_scales=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"one per species \(2\), got 3"):
        _soap(per_type_energy_shifts=[1.0, 2.0, 3.0])


@pytest.mark.parametrize("trainable", [False, True])
def test_trainable_flags(trainable):
    model = _soap(
        per_type_energy_scales_trainable=trainable,
        per_type_energy_shifts_trainable=trainable,
    )
    assert model.per_type_energy_scales.requires_grad is trainable
    assert model.per_type_energy_shifts.requires_grad is trainable


# ---- ZBL ---------------------------------------------------------------------------


def _zbl_pair(name: str):
    """(model without, model with ZBL) of one architecture, same seed."""
    if name == "soap_bpnn":
        return _soap(), _soap(zbl=True)
    small = SMALL_NEQUIP if name == "nequip" else SMALL_ALLEGRO
    models = [
        build_model(
            name, SPECIES, model_dtype="float64", seed=0, pair_potential=pair, **small
        )
        for pair in (None, "ZBL")
    ]
    return models[0], models[1]


@pytest.mark.parametrize("name", ["soap_bpnn", "nequip", "allegro"])
def test_zbl_raises_close_dimer_and_vanishes_beyond_radii(name):
    plain, with_zbl = _zbl_pair(name)
    assert plain.pair_potential is None and with_zbl.pair_potential is not None
    r_c = covalent_radii[29] + covalent_radii[47]  # 2.77 Å
    for distance in (0.8, 1.5):
        atoms = _dimer(distance)
        expected = _zbl_by_hand(distance, "Cu", "Ag")
        assert expected > 1.0
        difference = _energy(with_zbl, atoms) - _energy(plain, atoms)
        assert difference == pytest.approx(expected, rel=1e-10)
        # each atom of the pair gets half of it
        extra = (
            _outputs(with_zbl, atoms)[keys.ENERGIES]
            - _outputs(plain, atoms)[keys.ENERGIES]
        )
        np.testing.assert_allclose(
            extra,
            [expected / 2, expected / 2],
            rtol=1e-10,
        )
    for distance in (r_c + 1e-3, r_c + 0.5):
        atoms = _dimer(distance)
        assert distance < with_zbl.cutoff  # an edge, but no ZBL on it
        a, b = _outputs(plain, atoms), _outputs(with_zbl, atoms)
        assert b[keys.ENERGY][0] == pytest.approx(a[keys.ENERGY][0], abs=1e-12)
        np.testing.assert_allclose(b[keys.FORCES], a[keys.FORCES], atol=1e-12)


def test_zbl_forces_are_repulsive():
    plain, with_zbl = _zbl_pair("soap_bpnn")
    atoms = _dimer(1.0)
    extra = _outputs(with_zbl, atoms)[keys.FORCES] - _outputs(plain, atoms)[keys.FORCES]
    # atom 0 pushed to -x, atom 1 to +x, equal and opposite
    assert extra[0, 0] < -1.0 and extra[1, 0] > 1.0
    np.testing.assert_allclose(extra[0], -extra[1], rtol=1e-12)
    np.testing.assert_allclose(extra[:, 1:], 0.0, atol=1e-12)


# ---- switches ----------------------------------------------------------------------


def test_output_keys_follow_the_switches(model):
    graph = _graph(bulk(), model)
    basic = {keys.ENERGY, keys.ENERGIES, keys.LAST_LAYER_FEATURES}
    assert set(model(graph)) == basic | {keys.FORCES, keys.STRESS}
    assert set(model(graph, compute_forces=False)) == basic | {keys.STRESS}
    assert set(model(graph, compute_stress=False)) == basic | {keys.FORCES}
    assert set(model(graph, False, False)) == basic
    # the energy does not depend on what else is computed
    switches = [(False, False), (False, True), (True, False), (True, True)]
    energies = [model(graph, f, s)[keys.ENERGY].item() for f, s in switches]
    assert max(energies) - min(energies) < 1e-13


def test_stress_alone_matches_stress_with_forces(model):
    graph = _graph(bulk(), model)
    both = model(graph)
    alone = model(graph, compute_forces=False)
    torch.testing.assert_close(
        alone[keys.STRESS], both[keys.STRESS], rtol=1e-12, atol=1e-14
    )


def test_energy_only_model(model):
    energy_only = _soap(do_derivatives=False)
    assert energy_only.do_derivatives is False
    graph = _graph(bulk(), energy_only)
    outputs = energy_only(graph)  # forces and stress asked for, not given
    assert set(outputs) == {keys.ENERGY, keys.ENERGIES, keys.LAST_LAYER_FEATURES}
    assert not graph.positions.requires_grad
    assert outputs[keys.ENERGY].item() == pytest.approx(
        model(graph)[keys.ENERGY].item(), rel=1e-13
    )


def test_eval_forces_are_detached_and_training_forces_differentiable(model):
    graph = _graph(bulk(), model)
    assert not model.training
    assert not model(graph)[keys.FORCES].requires_grad
    training = _soap().train()
    forces = training(graph)[keys.FORCES]
    assert forces.requires_grad  # create_graph: force losses reach the weights
    (gradient,) = torch.autograd.grad(
        forces.square().sum(), [training.architecture.last_layer.weight]
    )
    assert gradient.abs().max() > 0


# ---- derivatives -------------------------------------------------------------------


@pytest.mark.parametrize("structure", ["bulk", "cluster"])
def test_forces_are_minus_energy_gradient(model, structure):
    atoms = bulk() if structure == "bulk" else _cluster()
    forces = _outputs(model, atoms)[keys.FORCES]
    assert np.abs(forces).max() > 0.05
    h = 1e-4
    numerical = np.zeros_like(forces)
    for atom in range(len(atoms)):
        for axis in range(3):
            energies = []
            for sign in (1, -1):
                displaced = atoms.copy()
                displaced.positions[atom, axis] += sign * h
                energies.append(_energy(model, displaced))
            numerical[atom, axis] = -(energies[0] - energies[1]) / (2 * h)
    np.testing.assert_allclose(forces, numerical, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(forces.sum(axis=0), 0.0, atol=1e-11)


def test_stress_is_strain_derivative_over_volume(model):
    atoms = bulk()
    atoms.set_cell(
        atoms.cell.array @ [[1, 0.05, 0], [0, 1, 0.03], [-0.02, 0, 1]], scale_atoms=True
    )  # triclinic, so shear components are not zero
    stress = _outputs(model, atoms)[keys.STRESS][0]
    assert stress.shape == (3, 3)
    np.testing.assert_array_equal(stress, stress.T)
    assert np.abs(stress).max() > 1e-3
    assert np.abs(stress[np.triu_indices(3, 1)]).max() > 1e-4
    h = 1e-5
    numerical = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            energies = []
            for sign in (1, -1):
                deformation = np.eye(3)
                deformation[a, b] += sign * h
                strained = atoms.copy()
                strained.positions = atoms.positions @ deformation
                strained.cell = atoms.cell.array @ deformation
                energies.append(_energy(model, strained))
            numerical[a, b] = (energies[0] - energies[1]) / (2 * h)
    numerical /= atoms.get_volume()
    np.testing.assert_allclose(stress, numerical, rtol=1e-6, atol=1e-9)


def test_stress_is_zero_without_a_volume(model):
    atoms = _cluster()  # zero cell
    outputs = _outputs(model, atoms)
    assert outputs[keys.STRESS].shape == (1, 3, 3)
    np.testing.assert_array_equal(outputs[keys.STRESS], 0.0)
    assert np.abs(outputs[keys.FORCES]).max() > 0.05


# ---- sums and batches --------------------------------------------------------------


def test_batch_gives_each_structure_its_own_results(model):
    first, second = bulk(), _cluster()
    alone = [_outputs(model, atoms) for atoms in (first, second)]
    batch = batch_graphs([_graph(first, model), _graph(second, model)])
    together = {k: v.detach().numpy() for k, v in model(batch).items()}
    assert together[keys.ENERGY].shape == (2,)
    np.testing.assert_allclose(
        together[keys.ENERGY],
        [alone[0][keys.ENERGY][0], alone[1][keys.ENERGY][0]],
        rtol=1e-12,
    )
    assert alone[0][keys.ENERGY][0] != pytest.approx(alone[1][keys.ENERGY][0])
    for name in (keys.ENERGIES, keys.FORCES, keys.LAST_LAYER_FEATURES):
        np.testing.assert_allclose(
            together[name],
            np.concatenate([alone[0][name], alone[1][name]]),
            rtol=1e-10,
            atol=1e-12,
            err_msg=name,
        )
    np.testing.assert_allclose(
        together[keys.STRESS],
        np.concatenate([alone[0][keys.STRESS], alone[1][keys.STRESS]]),
        rtol=1e-10,
        atol=1e-12,
    )


def test_per_atom_energies_sum_to_structure_energy(model):
    batch = batch_graphs([_graph(bulk(), model), _graph(_dimer(2.0), model)])
    outputs = model(batch, False, False)
    energies = outputs[keys.ENERGIES].detach()
    assert energies.shape == (6,)
    torch.testing.assert_close(
        outputs[keys.ENERGY].detach(),
        torch.stack([energies[:4].sum(), energies[4:].sum()]),
        rtol=1e-13,
        atol=1e-13,
    )


def test_energies_from_vectors_include_scales_shifts_and_zbl():
    model = _soap(per_type_energy_shifts=SHIFTS, zbl=True)
    atoms = _cluster()
    atoms.positions[1] = atoms.positions[0] + [1.2, 0, 0]  # a Cu-Ag pair inside ZBL
    graph = _graph(atoms, model)
    vectors = edge_vectors(graph)
    energies, features = model.energies_from_vectors(graph, vectors)
    outputs = model(graph, False, False)
    # the total per-atom energies, the same as the forward pass gives
    torch.testing.assert_close(energies, outputs[keys.ENERGIES], rtol=1e-13, atol=0.0)
    torch.testing.assert_close(features, outputs[keys.LAST_LAYER_FEATURES])
    assert energies.sum().item() == pytest.approx(
        outputs[keys.ENERGY].item(), rel=1e-13
    )
    # E_i = σ_t e_i + μ_t + ½ Σ_j E_ZBL(r_ij), e_i = f_i · w
    raw = features @ model.architecture.last_layer.weight[0]
    species = graph.species
    scales = torch.tensor(SCALES, dtype=torch.float64)[species]
    shifts = torch.tensor(SHIFTS, dtype=torch.float64)[species]
    pair = energies - scales * raw - shifts
    symbols = atoms.get_chemical_symbols()
    expected = np.zeros(len(atoms))
    for i, j in graph.edge_index.T.tolist():
        r = np.linalg.norm(atoms.positions[j] - atoms.positions[i])
        expected[i] += 0.5 * _zbl_by_hand(r, symbols[i], symbols[j])
    assert expected[0] > 1.0 and expected[1] > 1.0
    np.testing.assert_allclose(pair.detach().numpy(), expected, rtol=1e-9, atol=1e-10)


def test_energies_from_vectors_follow_the_vectors(model):
    """Edge vectors are inputs of their own: ∂E/∂r_ij by autograd."""
    graph = _graph(_dimer(2.2), model)
    vectors = edge_vectors(graph).detach().requires_grad_(True)
    energies, _ = model.energies_from_vectors(graph, vectors)
    (gradient,) = torch.autograd.grad(energies.sum(), [vectors])
    assert gradient.shape == (2, 3)
    # the force on atom 1 is -Σ_edges ∂E/∂r_ij ∂r_ij/∂R_1: +g(0→1) - g(1→0)
    forces = model(graph)[keys.FORCES]
    i = graph.edge_index[0]
    expected = gradient[i == 1].sum(0) - gradient[i == 0].sum(0)
    torch.testing.assert_close(forces[1], expected, rtol=1e-10, atol=1e-12)
    assert forces[1].abs().max() > 1e-3


# ---- no edges ----------------------------------------------------------------------


@pytest.mark.parametrize("periodic", [False, True])
def test_isolated_atom_has_zero_forces(periodic):
    model = _soap(per_type_energy_shifts=SHIFTS)
    atoms = ase.Atoms("Ag", positions=[[0.3, 0.2, 0.1]])
    if periodic:  # one atom in a cell larger than the cutoff: no images in range
        atoms.cell = np.eye(3) * 12.0
        atoms.pbc = True
    graph = _graph(atoms, model)
    assert graph.edge_index.shape == (2, 0)
    outputs = {k: v.detach().numpy() for k, v in model(graph).items()}
    np.testing.assert_array_equal(outputs[keys.FORCES], np.zeros((1, 3)))
    np.testing.assert_array_equal(outputs[keys.STRESS], np.zeros((1, 3, 3)))
    assert np.isfinite(outputs[keys.ENERGY]).all()
    # the same energy as an Ag atom far from a Cu one: only its own terms
    far = _dimer(20.0, "CuAg")
    assert _outputs(model, far)[keys.ENERGIES][1] == pytest.approx(
        outputs[keys.ENERGY][0], rel=1e-12
    )


def test_isolated_atom_batched_with_a_bulk(model):
    lone = ase.Atoms("Cu", positions=[[0, 0, 0]])
    batch = batch_graphs([_graph(lone, model), _graph(bulk(), model)])
    outputs = model(batch)
    forces = outputs[keys.FORCES].detach()
    np.testing.assert_array_equal(forces[0].numpy(), 0.0)
    np.testing.assert_allclose(
        forces[1:].numpy(), _outputs(model, bulk())[keys.FORCES], rtol=1e-10, atol=1e-12
    )


def test_architecture_interface_is_abstract():
    with pytest.raises(NotImplementedError):
        Architecture()(None, torch.zeros(0, 3))
