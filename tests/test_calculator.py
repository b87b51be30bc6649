"""Tests of `pes_calc.calculator.PESCalculator`: ASE results, skin, errors, dtypes."""

import ase
import ase.build
import numpy as np
import pytest
import torch
from ase import units
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet

from pes_calc import PESCalculator, build_model, save_model
from pes_calc.compile import compile_model
from pes_calc.neighbors import UnknownSpeciesError

SPECIES = ["Cu", "Ag"]
SOAP = {"max_angular": 2, "max_radial": 2}
# an untrained model gives small numbers; scale them so that comparisons mean something
SCALES = [20.0, 30.0]


def _model(**hypers):
    return build_model(
        "soap_bpnn", SPECIES, soap=SOAP, seed=0, per_type_energy_scales=SCALES, **hypers
    )


@pytest.fixture(scope="module")
def model64():
    return _model(model_dtype="float64").eval()


@pytest.fixture(scope="module")
def model_files(model64, tmp_path_factory):
    directory = tmp_path_factory.mktemp("calculator")
    safetensors = directory / "model.safetensors"
    save_model(model64, safetensors)
    script = directory / "model.pt"
    compile_model(model64, script)
    return {"safetensors": safetensors, "torchscript": script}


def _calculator(model, **kwargs) -> PESCalculator:
    return PESCalculator(model, device="cpu", **kwargs)


def _triclinic() -> ase.Atoms:
    """8 Cu/Ag atoms in a sheared, rattled cell smaller than twice the cutoff."""
    atoms = ase.build.bulk("Cu", "fcc", a=3.7) * (2, 2, 2)
    atoms.symbols[[1, 4, 6]] = "Ag"
    strain = [[0.03, 0.02, -0.04], [0.0, -0.02, 0.05], [0.01, 0.0, 0.04]]
    cell = atoms.cell.array @ (np.eye(3) + np.array(strain))
    atoms.set_cell(cell, scale_atoms=True)
    atoms.rattle(0.15, seed=1)
    return atoms


def _cluster() -> ase.Atoms:
    atoms = ase.build.bulk("Cu", "fcc", a=3.7, cubic=True)
    atoms.symbols[2] = "Ag"
    atoms.pbc = False
    atoms.cell = np.zeros((3, 3))
    atoms.rattle(0.1, seed=2)
    return atoms


def _slab(vacuum=None) -> ase.Atoms:
    atoms = ase.build.fcc111("Cu", (2, 2, 2), a=3.7, vacuum=vacuum)
    atoms.symbols[[0, 5]] = "Ag"
    atoms.rattle(0.1, seed=3)
    return atoms


def _results(calc: PESCalculator, atoms: ase.Atoms, stress: bool = True) -> dict:
    atoms = atoms.copy()
    atoms.calc = calc
    results = {
        "energy": atoms.get_potential_energy(),
        "forces": atoms.get_forces(),
        "energies": atoms.get_potential_energies(),
    }
    if stress:
        results["stress"] = atoms.get_stress()
    return results


def test_model_object_path_and_torchscript_agree(model64, model_files):
    atoms = _triclinic()
    expected = _results(_calculator(model64), atoms)
    assert abs(expected["energy"]) > 1e-2
    for source in ("safetensors", "torchscript"):
        results = _results(_calculator(model_files[source]), atoms)
        assert results["energy"] == pytest.approx(expected["energy"], rel=1e-12)
        for key in ("forces", "stress", "energies"):
            np.testing.assert_allclose(
                results[key], expected[key], rtol=1e-10, atol=1e-12, err_msg=source
            )


@pytest.mark.parametrize("source", ["object", "safetensors", "torchscript"])
def test_result_types(model64, model_files, source):
    model = model64 if source == "object" else model_files[source]
    calc = _calculator(model)
    atoms = _triclinic()
    atoms.calc = calc
    energy = atoms.get_potential_energy()
    assert type(calc.results["energy"]) is float
    assert isinstance(energy, float)
    assert calc.results["free_energy"] == energy
    assert atoms.get_potential_energy(force_consistent=True) == energy
    for name, shape in (("forces", (8, 3)), ("energies", (8,)), ("stress", (6,))):
        value = calc.results[name]
        assert isinstance(value, np.ndarray), name
        assert value.dtype == np.float64, name
        assert value.shape == shape, name
    assert calc.species == SPECIES
    assert calc.cutoff == 5.0


def test_float32_model_gives_float64_arrays():
    calc = _calculator(_model())
    assert calc.dtype == torch.float32
    atoms = _triclinic()
    atoms.calc = calc
    assert isinstance(atoms.get_potential_energy(), float)
    assert atoms.get_forces().dtype == np.float64
    assert atoms.get_stress().dtype == np.float64


def test_forces_match_finite_differences(model64):
    atoms = _triclinic()
    atoms.calc = _calculator(model64)
    forces = atoms.get_forces()
    assert np.abs(forces).max() > 0.1
    numerical = calculate_numerical_forces(atoms, eps=1e-4)
    np.testing.assert_allclose(forces, numerical, rtol=1e-6, atol=1e-7)
    # momentum is conserved: Newton's third law over a full neighbor list
    np.testing.assert_allclose(forces.sum(axis=0), 0.0, atol=1e-12)


def test_stress_matches_finite_differences(model64):
    atoms = _triclinic()
    atoms.calc = _calculator(model64)
    stress = atoms.get_stress()
    full = atoms.get_stress(voigt=False)
    assert np.abs(stress).max() > 1e-3
    assert np.abs(stress[3:]).max() > 1e-4  # shear components are tested too
    numerical = calculate_numerical_stress(atoms, eps=1e-5)
    np.testing.assert_allclose(stress, numerical, rtol=1e-6, atol=1e-9)
    # Voigt order (xx, yy, zz, yz, xz, xy) and symmetry of the full tensor
    np.testing.assert_array_equal(
        stress, [full[0, 0], full[1, 1], full[2, 2], full[1, 2], full[0, 2], full[0, 1]]
    )
    np.testing.assert_array_equal(full, full.T)


def test_per_atom_energies_sum_to_energy(model64):
    atoms = _triclinic()
    atoms.calc = _calculator(model64)
    energies = atoms.get_potential_energies()
    assert np.ptp(energies) > 0  # not all the same
    assert energies.sum() == pytest.approx(atoms.get_potential_energy(), rel=1e-13)


class _CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, *args):
        self.calls += 1
        return self.model(*args)


def test_model_called_once_per_geometry(model64):
    calc = _calculator(model64)
    counter = _CountingModel(calc.model)
    calc.model = counter
    atoms = _triclinic()
    atoms.calc = calc
    energy = atoms.get_potential_energy()
    atoms.get_forces()
    atoms.get_stress()
    atoms.get_potential_energies()
    atoms.get_potential_energy()
    assert counter.calls == 1
    atoms.positions[0, 0] += 0.01
    atoms.get_forces()
    new_energy = atoms.get_potential_energy()
    atoms.get_stress()
    assert counter.calls == 2
    assert new_energy != energy


def test_cluster_has_no_stress(model64):
    atoms = _cluster()
    atoms.calc = _calculator(model64)
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    assert np.isfinite(energy) and abs(energy) > 1e-3
    np.testing.assert_allclose(
        forces, calculate_numerical_forces(atoms, eps=1e-4), rtol=1e-6, atol=1e-7
    )
    with pytest.raises(PropertyNotImplementedError, match="stress"):
        atoms.get_stress()
    # the failed stress request leaves the other results usable
    assert atoms.get_potential_energy() == energy


def test_slab_without_cell_volume_has_no_stress(model64):
    atoms = _slab()  # pbc (T, T, F), zero third cell vector
    assert atoms.pbc.tolist() == [True, True, False] and atoms.cell.volume == 0
    atoms.calc = _calculator(model64)
    assert np.isfinite(atoms.get_potential_energy())
    assert atoms.get_forces().shape == (8, 3)
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_stress()


def test_slab_with_full_cell_has_stress(model64):
    atoms = _slab(vacuum=5.0)
    assert atoms.pbc.tolist() == [True, True, False] and atoms.cell.volume > 0
    atoms.calc = _calculator(model64)
    stress = atoms.get_stress()
    assert stress.shape == (6,)
    assert np.abs(stress).max() > 1e-4
    numerical = calculate_numerical_stress(atoms, eps=1e-5)
    np.testing.assert_allclose(stress, numerical, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(
        atoms.get_forces(),
        calculate_numerical_forces(atoms, eps=1e-4),
        rtol=1e-6,
        atol=1e-7,
    )


# ---- errors ------------------------------------------------------------------------


def test_unknown_element(model64):
    atoms = _triclinic()
    atoms.symbols[3] = "Au"
    atoms.calc = _calculator(model64)
    with pytest.raises(UnknownSpeciesError, match=r"Au.*species are Cu, Ag"):
        atoms.get_potential_energy()


def test_unknown_element_after_a_valid_call(model64):
    atoms = _triclinic()
    atoms.calc = _calculator(model64)
    atoms.get_potential_energy()
    atoms.symbols[0] = "Zn"
    with pytest.raises(ValueError, match=r"Zn.*species are Cu, Ag"):
        atoms.get_forces()


@pytest.mark.parametrize("skin", [0.0, 0.5])
def test_nan_positions(model64, skin):
    atoms = _triclinic()
    calc = _calculator(model64, skin=skin)
    atoms.calc = calc
    atoms.positions[2, 0] = np.nan
    with pytest.raises(ValueError, match=r"atoms \[2\] are NaN"):
        atoms.get_potential_energy()
    # also when a neighbor list from an earlier call could be reused
    atoms = _triclinic()
    atoms.calc = calc
    atoms.get_potential_energy()
    atoms.positions[5, 1] = np.nan
    with pytest.raises(ValueError, match=r"atoms \[5\] are NaN"):
        atoms.get_forces()


def test_negative_skin(model64):
    with pytest.raises(ValueError, match="skin"):
        _calculator(model64, skin=-0.1)


# ---- neighbor-list skin -------------------------------------------------------------


def _md_trajectory(model, skin: float, steps: int = 30):
    atoms = ase.build.bulk("Cu", "fcc", a=3.7, cubic=True) * (2, 1, 1)
    atoms.symbols[[1, 6]] = "Ag"
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    calc = _calculator(model, skin=skin)
    atoms.calc = calc
    dynamics = VelocityVerlet(atoms, timestep=5 * units.fs)
    positions = [atoms.positions.copy()]
    energies = []
    for _ in range(steps):
        dynamics.run(1)
        positions.append(atoms.positions.copy())
        energies.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())
    return np.array(positions), np.array(energies), calc


@pytest.mark.filterwarnings("ignore:Use thermalize_momenta:DeprecationWarning")
def test_skin_gives_the_same_md_trajectory(model64):
    positions0, energies0, calc0 = _md_trajectory(model64, skin=0.0)
    positions5, energies5, calc5 = _md_trajectory(model64, skin=0.5)
    # the atoms really moved, far enough to force at least one rebuild
    displacement = np.linalg.norm(positions0[-1] - positions0[0], axis=1).max()
    assert displacement > 0.25
    np.testing.assert_allclose(positions5, positions0, rtol=0, atol=1e-8)
    np.testing.assert_allclose(energies5, energies0, rtol=0, atol=1e-8)
    assert calc0.neighbor_list_reuses == 0
    assert calc5.neighbor_list_reuses > 0
    assert calc5.neighbor_list_builds >= 2
    assert calc5.neighbor_list_builds < calc0.neighbor_list_builds
    # energy is conserved along the way (a check on the forces, not the skin)
    assert np.ptp(energies5) < 1e-2 * np.abs(energies5).max() + 1e-3


def test_reused_neighbor_list_matches_a_fresh_one(model64):
    atoms = _triclinic()
    reference = _results(_calculator(model64, skin=0.0), atoms)
    calc = _calculator(model64, skin=1.0)
    atoms.calc = calc
    atoms.get_forces()
    # small moves (< skin/2): the list is reused and results equal a fresh one
    rng = np.random.default_rng(5)
    for _ in range(3):
        atoms.positions += rng.uniform(-0.1, 0.1, size=atoms.positions.shape) / 3
        expected = _results(_calculator(model64, skin=0.0), atoms)
        np.testing.assert_allclose(atoms.get_forces(), expected["forces"], atol=1e-12)
        np.testing.assert_allclose(atoms.get_stress(), expected["stress"], atol=1e-12)
        energy = atoms.get_potential_energy()
        assert energy == pytest.approx(expected["energy"], rel=1e-12)
    assert calc.neighbor_list_builds == 1 and calc.neighbor_list_reuses == 3
    assert reference["energy"] != pytest.approx(atoms.get_potential_energy(), rel=1e-6)


def test_cell_change_rebuilds_the_neighbor_list(model64):
    atoms = _triclinic()
    calc = _calculator(model64, skin=0.5)
    atoms.calc = calc
    atoms.get_potential_energy()
    atoms.set_cell(atoms.cell.array * 1.02, scale_atoms=True)
    energy = atoms.get_potential_energy()
    assert calc.neighbor_list_builds == 2
    expected = _results(_calculator(model64, skin=0.0), atoms)["energy"]
    assert energy == pytest.approx(expected, rel=1e-12)


def test_results_correct_after_wrapping(model64):
    atoms = _triclinic()
    # push atoms out of the cell, by lattice vectors and by small steps across faces
    atoms.positions[0] += atoms.cell[0] - atoms.cell[2]
    atoms.positions[3] -= 2 * atoms.cell[1]
    fractional = atoms.get_scaled_positions(wrap=False)[5]
    atoms.positions[5] -= (fractional[0] + 0.01) * atoms.cell[0]  # just outside
    assert atoms.get_scaled_positions(wrap=False)[5, 0] == pytest.approx(-0.01)
    expected = _results(_calculator(model64, skin=0.0), atoms)
    calc = _calculator(model64, skin=0.5)
    atoms.calc = calc
    np.testing.assert_allclose(atoms.get_forces(), expected["forces"], atol=1e-12)
    atoms.wrap()
    assert np.all(atoms.get_scaled_positions(wrap=False) >= 0)
    np.testing.assert_allclose(atoms.get_forces(), expected["forces"], atol=1e-10)
    np.testing.assert_allclose(atoms.get_stress(), expected["stress"], atol=1e-12)
    assert atoms.get_potential_energy() == pytest.approx(expected["energy"], rel=1e-12)
    np.testing.assert_allclose(
        atoms.get_potential_energies(), expected["energies"], atol=1e-12
    )
    # and the same after a short move that takes that atom back across the face:
    # wrapping then moves it by a whole cell vector, and the reused list must not
    # be applied to the jumped atom
    atoms.positions[5] += 0.1 * atoms.cell[0] / np.linalg.norm(atoms.cell[0])
    assert atoms.get_scaled_positions(wrap=False)[5, 0] > 1.0
    moved = _results(_calculator(model64, skin=0.0), atoms)
    np.testing.assert_allclose(atoms.get_forces(), moved["forces"], atol=1e-12)
    builds = calc.neighbor_list_builds
    atoms.wrap()
    np.testing.assert_allclose(atoms.get_forces(), moved["forces"], atol=1e-10)
    np.testing.assert_allclose(atoms.get_stress(), moved["stress"], atol=1e-12)
    assert calc.neighbor_list_builds == builds + 1


# ---- dtype and device ----------------------------------------------------------------


def test_global_default_dtype_untouched(model_files):
    before = torch.get_default_dtype()
    calcs = [
        _calculator(_model(model_dtype="float64")),
        _calculator(model_files["safetensors"]),
        _calculator(model_files["torchscript"]),
        _calculator(
            build_model("soap_bpnn", ["Ag"], soap={"max_angular": 1, "max_radial": 3})
        ),
    ]
    for calc in calcs:
        atoms = ase.build.bulk("Ag", "fcc", a=4.1)
        atoms.calc = calc
        atoms.get_stress()
        assert torch.get_default_dtype() == before


def test_float64_run_of_a_float32_model():
    model32 = _model()
    reference = _calculator(_model().double())  # same weights, converted up front
    calc = _calculator(model32, dtype=torch.float64)
    assert calc.dtype == torch.float64
    assert calc.model.per_type_energy_scales.dtype == torch.float64
    # the caller's model is not converted behind its back
    assert model32.per_type_energy_scales.dtype == torch.float32
    atoms = _triclinic()
    expected = _results(reference, atoms)
    results = _results(calc, atoms)
    assert results["energy"] == pytest.approx(expected["energy"], rel=1e-12)
    np.testing.assert_allclose(results["forces"], expected["forces"], atol=1e-12)
    np.testing.assert_allclose(results["stress"], expected["stress"], atol=1e-12)
    # and float32 gives nearly the same numbers
    results32 = _results(_calculator(model32), atoms)
    assert results32["energy"] == pytest.approx(expected["energy"], rel=1e-4)
    np.testing.assert_allclose(results32["forces"], expected["forces"], atol=1e-3)


def test_float64_run_of_a_float32_torchscript(tmp_path):
    path = tmp_path / "model32.pt"
    compile_model(_model(), path)
    calc = _calculator(path, dtype=torch.float64)
    expected = _results(_calculator(_model().double()), _triclinic())
    results = _results(calc, _triclinic())
    assert results["energy"] == pytest.approx(expected["energy"], rel=1e-12)
    np.testing.assert_allclose(results["forces"], expected["forces"], atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("source", ["object", "safetensors", "torchscript"])
def test_cuda_matches_cpu(model64, model_files, source):
    model = model64 if source == "object" else model_files[source]
    atoms = _triclinic()
    expected = _results(_calculator(model64), atoms)
    calc = PESCalculator(model, device="cuda")
    assert calc.device.type == "cuda"
    results = _results(calc, atoms)
    assert results["energy"] == pytest.approx(expected["energy"], rel=1e-10)
    for key in ("forces", "stress", "energies"):
        np.testing.assert_allclose(results[key], expected[key], rtol=1e-8, atol=1e-10)
    # the caller's CPU model stays on the CPU
    assert model64.per_type_energy_scales.device.type == "cpu"
