"""Tests of `pes_calc.results`: which cells have stress, splitting batched outputs
into ASE-shaped results, and results stored on `ase.Atoms` (and extxyz)."""

import ase
import ase.build
import ase.io
import numpy as np
import pytest
import torch

from pes_calc import keys
from pes_calc.results import as_atoms, has_volume, split_outputs

SIZES = [2, 3]  # two structures of 2 and 3 atoms
MEMBERS = 4


# ---- has_volume --------------------------------------------------------------------


def test_has_volume_for_periodic_bulk():
    assert has_volume(ase.build.bulk("Cu", "fcc", a=3.6))
    assert has_volume(ase.build.bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1))


def test_has_volume_for_a_slab_with_vacuum():
    slab = ase.build.fcc111("Cu", (2, 2, 2), vacuum=5.0)
    assert slab.pbc.tolist() == [True, True, False] and slab.cell.volume > 0
    assert has_volume(slab)


def test_no_volume_for_a_slab_without_vacuum_cell():
    slab = ase.build.fcc111("Cu", (2, 2, 2))  # third cell vector zero
    assert slab.pbc.tolist() == [True, True, False] and slab.cell.volume == 0
    assert not has_volume(slab)


def test_no_volume_for_a_molecule():
    molecule = ase.build.molecule("H2O")
    assert not molecule.pbc.any() and molecule.cell.volume == 0
    assert not has_volume(molecule)
    # a cell, but no periodic direction: still no stress
    molecule.center(vacuum=4.0)
    assert molecule.cell.volume > 0
    assert not has_volume(molecule)


def test_no_volume_for_a_periodic_structure_with_zero_cell():
    atoms = ase.Atoms("Cu2", positions=[[0, 0, 0], [1.5, 1.5, 0]], pbc=True)
    assert atoms.cell.volume == 0
    assert not has_volume(atoms)
    flat = ase.Atoms("Cu", cell=[[3, 0, 0], [0, 3, 0], [3, 3, 0]], pbc=True)
    assert not has_volume(flat)  # three vectors in a plane


# ---- split_outputs -----------------------------------------------------------------


def _outputs(dtype=torch.float64) -> dict:
    """Hand-made model outputs of two structures (2 and 3 atoms), values by index."""
    n = sum(SIZES)
    stress = torch.zeros(2, 3, 3, dtype=dtype)
    for s in range(2):
        # a symmetric stress with distinct entries: σ_ab = 10 s + (a+1)(b+1)
        a = torch.arange(1.0, 4.0, dtype=dtype)
        stress[s] = 10 * s + a[:, None] * a[None, :]
        stress[s, 1, 2] = stress[s, 2, 1] = 10 * s + 0.5  # yz
        stress[s, 0, 2] = stress[s, 2, 0] = 10 * s + 0.25  # xz
        stress[s, 0, 1] = stress[s, 1, 0] = 10 * s + 0.125  # xy
    return {
        keys.ENERGY: torch.tensor([-1.5, 2.25], dtype=dtype),
        keys.ENERGIES: torch.arange(n, dtype=dtype) * 0.5,
        keys.FORCES: torch.arange(n * 3, dtype=dtype).reshape(n, 3),
        keys.STRESS: stress,
        keys.ENERGY_UNCERTAINTY: torch.tensor([0.1, 0.2], dtype=dtype),
        keys.ENERGIES_UNCERTAINTY: torch.arange(n, dtype=dtype) * 0.01,
        keys.ENERGY_ENSEMBLE: torch.arange(2.0 * MEMBERS, dtype=dtype).reshape(2, -1),
        keys.FORCES_UNCERTAINTY: torch.arange(n * 3, dtype=dtype).reshape(n, 3) * 0.1,
        keys.FORCES_ENSEMBLE: torch.arange(MEMBERS * n * 3, dtype=dtype).reshape(
            MEMBERS, n, 3
        ),
    }


def test_split_outputs_energies_are_floats():
    first, second = split_outputs(_outputs(), SIZES, [True, True])
    assert type(first["energy"]) is float and type(second["energy"]) is float
    assert first["energy"] == -1.5 and second["energy"] == 2.25
    assert first["free_energy"] == first["energy"]
    assert second["free_energy"] == second["energy"]
    assert type(first[keys.ENERGY_UNCERTAINTY]) is float
    assert second[keys.ENERGY_UNCERTAINTY] == pytest.approx(0.2, rel=1e-15)


def test_split_outputs_splits_per_atom_arrays():
    outputs = _outputs()
    first, second = split_outputs(outputs, SIZES, [True, True])
    forces = outputs[keys.FORCES].numpy()
    np.testing.assert_array_equal(first["forces"], forces[:2])
    np.testing.assert_array_equal(second["forces"], forces[2:])
    np.testing.assert_array_equal(first["energies"], [0.0, 0.5])
    np.testing.assert_array_equal(second["energies"], [1.0, 1.5, 2.0])
    np.testing.assert_array_equal(second[keys.ENERGIES_UNCERTAINTY], [0.02, 0.03, 0.04])
    assert second[keys.FORCES_UNCERTAINTY].shape == (3, 3)
    for result, size in zip((first, second), SIZES, strict=True):
        assert result["forces"].shape == (size, 3)
        assert result["energies"].shape == (size,)
        assert isinstance(result["forces"], np.ndarray)
        assert result["forces"].dtype == np.float64


def test_split_outputs_arrays_are_copies():
    outputs = _outputs()
    first, _ = split_outputs(outputs, SIZES, [True, True])
    first["forces"][0, 0] = 1e9
    assert outputs[keys.FORCES][0, 0] == 0.0
    again, _ = split_outputs(outputs, SIZES, [True, True])
    assert again["forces"][0, 0] == 0.0


def test_split_outputs_stress_in_voigt_order():
    first, second = split_outputs(_outputs(), SIZES, [True, True])
    # xx yy zz yz xz xy
    np.testing.assert_array_equal(first["stress"], [1.0, 4.0, 9.0, 0.5, 0.25, 0.125])
    np.testing.assert_array_equal(
        second["stress"], [11.0, 14.0, 19.0, 10.5, 10.25, 10.125]
    )
    assert first["stress"].shape == (6,)


def test_split_outputs_drops_stress_without_volume():
    first, second = split_outputs(_outputs(), SIZES, [False, True])
    assert "stress" not in first
    np.testing.assert_array_equal(second["stress"][:3], [11.0, 14.0, 19.0])
    first, second = split_outputs(_outputs(), SIZES, [True, False])
    assert "stress" in first and "stress" not in second


def test_split_outputs_ensembles():
    outputs = _outputs()
    first, second = split_outputs(outputs, SIZES, [True, True])
    ensemble = outputs[keys.FORCES_ENSEMBLE].numpy()
    assert first[keys.FORCES_ENSEMBLE].shape == (MEMBERS, 2, 3)
    assert second[keys.FORCES_ENSEMBLE].shape == (MEMBERS, 3, 3)
    np.testing.assert_array_equal(first[keys.FORCES_ENSEMBLE], ensemble[:, :2])
    np.testing.assert_array_equal(second[keys.FORCES_ENSEMBLE], ensemble[:, 2:])
    # member 1's force on the second structure's first atom (atom 2 overall)
    np.testing.assert_array_equal(
        second[keys.FORCES_ENSEMBLE][1, 0], [21.0, 22.0, 23.0]
    )
    np.testing.assert_array_equal(first[keys.ENERGY_ENSEMBLE], [0.0, 1.0, 2.0, 3.0])
    np.testing.assert_array_equal(second[keys.ENERGY_ENSEMBLE], [4.0, 5.0, 6.0, 7.0])


def test_split_outputs_keeps_the_named_properties_only():
    names = ["energy", "forces"]
    first, second = split_outputs(_outputs(), SIZES, [True, True], names=names)
    assert set(first) == set(second) == {"energy", "forces"}  # no free_energy
    assert second["energy"] == 2.25 and second["forces"].shape == (3, 3)
    # named but not among the outputs: skipped
    outputs = {keys.ENERGY: torch.tensor([3.0, 4.0])}
    names = ["energy", "free_energy", "forces"]
    first, _ = split_outputs(outputs, SIZES, [True, True], names=names)
    assert first == {"energy": 3.0, "free_energy": 3.0}


def test_split_outputs_converts_float32_and_gradients():
    outputs = {k: v.requires_grad_(True) for k, v in _outputs(torch.float32).items()}
    first, second = split_outputs(outputs, SIZES, [True, True])
    assert first["forces"].dtype == np.float64
    assert second["stress"].dtype == np.float64
    assert first[keys.FORCES_ENSEMBLE].dtype == np.float64
    assert first["energy"] == -1.5 and type(first["energy"]) is float


def test_split_outputs_of_one_structure():
    outputs = {
        keys.ENERGY: torch.tensor([0.75], dtype=torch.float64),
        keys.FORCES: torch.ones(3, 3, dtype=torch.float64),
    }
    (result,) = split_outputs(outputs, [3], [False])
    assert set(result) == {"energy", "free_energy", "forces"}
    assert result["energy"] == result["free_energy"] == 0.75
    np.testing.assert_array_equal(result["forces"], np.ones((3, 3)))


# ---- as_atoms ----------------------------------------------------------------------


def _structure() -> ase.Atoms:
    atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)[:3]
    atoms.symbols[1] = "Ag"
    return atoms


def _result() -> dict:
    return split_outputs(_outputs(), SIZES, [True, True])[1]  # the 3-atom one


def test_as_atoms_basic_properties_in_a_single_point_calculator():
    atoms = _structure()
    result = _result()
    stored = as_atoms(atoms, result)
    assert stored is not atoms and atoms.calc is None  # a copy
    assert stored.get_potential_energy() == 2.25
    assert stored.get_potential_energy(force_consistent=True) == 2.25
    np.testing.assert_array_equal(stored.get_forces(), result["forces"])
    np.testing.assert_array_equal(stored.get_stress(), result["stress"])
    np.testing.assert_array_equal(stored.get_potential_energies(), [1.0, 1.5, 2.0])
    np.testing.assert_array_equal(stored.positions, atoms.positions)
    assert set(stored.calc.results) == {
        "energy",
        "free_energy",
        "energies",
        "forces",
        "stress",
    }


def test_as_atoms_uncertainties_in_info_and_arrays():
    result = _result()
    stored = as_atoms(_structure(), result)
    assert stored.info[keys.ENERGY_UNCERTAINTY] == pytest.approx(0.2, rel=1e-15)
    np.testing.assert_array_equal(stored.info[keys.ENERGY_ENSEMBLE], [4, 5, 6, 7])
    np.testing.assert_array_equal(
        stored.arrays[keys.ENERGIES_UNCERTAINTY], [0.02, 0.03, 0.04]
    )
    np.testing.assert_array_equal(
        stored.arrays[keys.FORCES_UNCERTAINTY], result[keys.FORCES_UNCERTAINTY]
    )
    assert keys.FORCES_UNCERTAINTY not in stored.info


def test_as_atoms_forces_ensemble_as_columns():
    result = _result()
    ensemble = result[keys.FORCES_ENSEMBLE]  # (M, N, 3)
    stored = as_atoms(_structure(), result)
    columns = stored.arrays[keys.FORCES_ENSEMBLE]
    assert columns.shape == (3, 3 * MEMBERS)
    assert columns.flags["C_CONTIGUOUS"]
    for k in range(MEMBERS):
        np.testing.assert_array_equal(columns[:, 3 * k : 3 * k + 3], ensemble[k])
    # member 2, atom 1 of the structure (atom 3 overall): (2 * 5 + 3) * 3 = 39
    np.testing.assert_array_equal(columns[1, 6:9], [39.0, 40.0, 41.0])


def test_as_atoms_without_stress():
    first = split_outputs(_outputs(), SIZES, [False, True])[0]
    stored = as_atoms(_structure()[:2], first)
    assert stored.get_potential_energy() == -1.5
    assert "stress" not in stored.calc.results


def test_as_atoms_extxyz_round_trip(tmp_path):
    result = _result()
    path = tmp_path / "results.xyz"
    ase.io.write(path, as_atoms(_structure(), result), format="extxyz")
    read = ase.io.read(path, format="extxyz")
    assert read.get_potential_energy() == pytest.approx(2.25, abs=1e-8)
    np.testing.assert_allclose(read.get_forces(), result["forces"], atol=1e-8)
    np.testing.assert_allclose(read.get_stress(), result["stress"], atol=1e-8)
    np.testing.assert_allclose(
        read.arrays[keys.FORCES_ENSEMBLE],
        as_atoms(_structure(), result).arrays[keys.FORCES_ENSEMBLE],
        atol=1e-8,
    )
    assert read.info[keys.ENERGY_UNCERTAINTY] == pytest.approx(0.2, abs=1e-8)
    np.testing.assert_allclose(read.info[keys.ENERGY_ENSEMBLE], [4, 5, 6, 7])
