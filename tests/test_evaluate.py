"""Tests of `pes_calc.evaluate` / `PESCalculator.calculate_batch`: batched results
equal one `PESCalculator` call per structure, for every result and artefact."""

import io

import ase
import ase.build
import ase.io
import numpy as np
import pytest
import torch
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.singlepoint import SinglePointCalculator

from pes_calc import PESCalculator, build_model, evaluate, save_model
from pes_calc.compile import compile_model
from pes_calc.neighbors import UnknownSpeciesError, atoms_to_graph
from pes_calc.train.data import LabelKeys, extract_labels, labelled_graphs
from pes_calc.train.llpr import wrap

SPECIES = ["Cu", "Ag"]
SOAP = {"max_angular": 2, "max_radial": 2}
BPNN = {"num_hidden_layers": 1, "num_neurons_per_layer": 6}
# an untrained model gives small numbers; scale them so that comparisons mean something
SCALES = [20.0, 30.0]
TOLERANCE = 1e-10
MEMBERS = 4


@pytest.fixture(scope="module")
def model():
    return build_model(
        "soap_bpnn",
        SPECIES,
        soap=SOAP,
        bpnn=BPNN,
        seed=0,
        model_dtype="float64",
        per_type_energy_scales=SCALES,
    ).eval()


@pytest.fixture(scope="module")
def llpr(model):
    """A fitted LLPR around ``model`` with a small ensemble; α from validation
    labels that differ from the model by 0.05 eV/atom (σ in a plausible range)."""
    train = _structures()[:6]
    val = _structures(seed=50)[:5]
    noise = np.random.default_rng(7).normal(0.0, 0.05, len(val))
    for atoms, error in zip(val, noise, strict=True):
        atoms.calc = PESCalculator(model, device="cpu")
        energy = atoms.get_potential_energy() + error * len(atoms)
        atoms.calc = SinglePointCalculator(atoms, energy=energy)
    labels = extract_labels(val, LabelKeys(forces=None, stress=None))
    return wrap(
        model,
        MEMBERS,
        [atoms_to_graph(atoms, SPECIES, model.cutoff) for atoms in train],
        labelled_graphs(val, labels, SPECIES, model.cutoff),
        batch_size=4,
        seed=1,
    ).eval()


def _structures(seed: int = 0) -> list[ase.Atoms]:
    """Nine structures of 1 to 16 atoms: bulk cells (one atom, triclinic,
    supercell), a cluster, a slab with vacuum in its cell (has a volume: stress),
    a slab without a third cell vector (no stress) and a wire (one periodic axis)."""
    rng = np.random.default_rng(seed)
    primitive = ase.build.bulk("Cu", "fcc", a=3.6)
    triclinic = ase.build.bulk("Cu", "fcc", a=3.7) * (2, 2, 2)
    triclinic.set_cell(
        triclinic.cell.array @ (np.eye(3) + rng.uniform(-0.04, 0.04, (3, 3))),
        scale_atoms=True,
    )
    supercell = ase.build.bulk("Cu", "fcc", a=3.65, cubic=True) * (2, 2, 1)
    cubic = ase.build.bulk("Cu", "fcc", a=3.55, cubic=True)
    cluster = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True) + ase.Atoms(
        "Cu", positions=[[1.8, 1.8, 1.8]]
    )
    cluster.pbc = False
    cluster.cell = np.zeros((3, 3))
    slab = ase.build.fcc111("Cu", (2, 2, 3), a=3.6, vacuum=4.0)
    slab.info.clear()  # adsorbate sites: not for extxyz
    bare_slab = ase.build.fcc100("Cu", (2, 2, 2), a=3.6)
    bare_slab.info.clear()
    bare_slab.cell[2] = 0.0
    wire = ase.Atoms(
        "Cu3",
        positions=[[0, 0, 0], [2.5, 0.4, 0], [5.0, 0, 0.3]],
        cell=[7.5, 0, 0],
        pbc=[True, False, False],
    )
    structures = [
        primitive,
        triclinic,
        supercell,
        cluster,
        slab,
        cubic,
        bare_slab,
        wire,
        cubic.copy(),
    ]
    for atoms in structures:
        symbols = rng.choice(SPECIES, size=len(atoms))
        atoms.set_chemical_symbols(list(symbols))
        atoms.positions += rng.normal(0.0, 0.08, size=atoms.positions.shape)
    return structures


def _one_by_one(model, structures, properties=("energy", "energies", "forces")):
    """``PESCalculator.results`` of each structure on its own (a new calculator
    each time: no neighbor list carried over)."""
    results = []
    for atoms in structures:
        calculator = PESCalculator(model, device="cpu")
        asked = list(properties)
        if np.any(atoms.pbc) and atoms.cell.volume > 1e-12:
            asked.append("stress")
        calculator.calculate(atoms.copy(), asked)
        results.append(calculator.results)
    return results


def _assert_same(batched: dict, single: dict, tolerance: float = TOLERANCE) -> None:
    assert set(batched) == set(single)
    for name, expected in single.items():
        np.testing.assert_allclose(
            batched[name], expected, rtol=0, atol=tolerance, err_msg=name
        )


@pytest.mark.parametrize("batch_size", [1, 2, 4, 9, 64])
def test_batched_equals_one_by_one(model, batch_size):
    structures = _structures()
    batched = evaluate(model, structures, batch_size=batch_size, device="cpu")
    single = _one_by_one(model, structures)
    assert len(batched) == len(structures)
    for result, expected in zip(batched, single, strict=True):
        _assert_same(result, expected)
    has_stress = ["stress" in result for result in batched]
    # bulk and the slab with vacuum in its cell; not the cluster, bare slab or wire
    assert has_stress == [True, True, True, False, True, True, False, False, True]
    assert batched[1]["forces"].shape == (8, 3) and batched[1]["stress"].shape == (6,)
    assert np.abs(batched[1]["stress"]).max() > 1e-3  # a real number is compared
    assert isinstance(batched[0]["energy"], float)


def test_results_do_not_depend_on_batch_neighbors(model):
    """A structure's results are the same alone and amid others (no cross-talk
    through shared atom or structure indices)."""
    structures = _structures()
    alone = evaluate(model, structures[4:5], device="cpu")[0]
    amid = evaluate(model, structures, batch_size=len(structures), device="cpu")[4]
    _assert_same(amid, alone)


def test_calculate_batch_uses_the_calculators_model_and_keeps_its_state(model):
    structures = _structures()
    calculator = PESCalculator(model, device="cpu")
    atoms = structures[1].copy()
    atoms.calc = calculator
    energy = atoms.get_potential_energy()
    batched = calculator.calculate_batch(structures, batch_size=4)
    for result, expected in zip(batched, _one_by_one(model, structures), strict=True):
        _assert_same(result, expected)
    assert calculator.results["energy"] == energy  # its own results untouched
    assert calculator.neighbor_list_builds == 1
    with pytest.raises(ValueError, match="come from the calculator"):
        evaluate(calculator, structures, dtype=torch.float32)


def test_files_and_torchscript_give_the_same(model, tmp_path):
    structures = _structures()
    save_model(model, tmp_path / "model.safetensors")
    compile_model(model, tmp_path / "model.pt")
    expected = _one_by_one(model, structures)
    for path in ("model.safetensors", "model.pt"):
        batched = evaluate(tmp_path / path, structures, batch_size=4, device="cpu")
        for result, single in zip(batched, expected, strict=True):
            _assert_same(result, single)


def test_float32_runs_in_float32(model):
    structures = _structures()[:4]
    batched = evaluate(
        model, structures, batch_size=3, device="cpu", dtype=torch.float32
    )
    single = []
    for atoms in structures:
        atoms = atoms.copy()
        atoms.calc = PESCalculator(model, device="cpu", dtype=torch.float32)
        single.append(atoms.get_forces())
    for result, forces in zip(batched, single, strict=True):
        # float32 sums in another order: equal to its rounding, not bit for bit
        np.testing.assert_allclose(result["forces"], forces, rtol=0, atol=2e-5)
        assert result["forces"].dtype == np.float64  # numpy results are float64


def test_llpr_uncertainties_equal_the_calculators(llpr):
    structures = _structures()
    properties = (
        "energy",
        "energies",
        "forces",
        "energy_uncertainty",
        "energies_uncertainty",
        "energy_ensemble",
        "forces_uncertainty",
        "forces_ensemble",
    )
    single = _one_by_one(llpr, structures, properties)
    batched = evaluate(
        llpr, structures, batch_size=4, device="cpu", properties=[*properties, "stress"]
    )
    for result, expected in zip(batched, single, strict=True):
        expected = {k: v for k, v in expected.items() if k != "free_energy"}
        _assert_same(result, expected)
    assert batched[1]["energy_ensemble"].shape == (MEMBERS,)
    assert batched[1]["forces_ensemble"].shape == (MEMBERS, 8, 3)
    assert batched[1]["energy_uncertainty"] > 0
    assert np.all(batched[1]["forces_uncertainty"] > 0)
    assert llpr.ensemble_forces is True  # the model's own switch is restored


def test_llpr_default_properties_skip_ensemble_forces(llpr, tmp_path):
    structures = _structures()[:5]
    batched = evaluate(llpr, structures, batch_size=2, device="cpu")
    single = _one_by_one(llpr, structures)
    assert "forces_uncertainty" not in batched[0]
    for result, expected in zip(batched, single, strict=True):
        _assert_same(result, expected)
    # the same through TorchScript, with the extra force-ensemble backward passes
    compile_model(llpr, tmp_path / "llpr.pt")
    compiled = evaluate(
        tmp_path / "llpr.pt",
        structures,
        batch_size=3,
        device="cpu",
        properties=["energy_uncertainty", "forces_uncertainty"],
    )
    eager = evaluate(
        llpr,
        structures,
        batch_size=5,
        device="cpu",
        properties=["energy_uncertainty", "forces_uncertainty"],
    )
    for result, expected in zip(compiled, eager, strict=True):
        _assert_same(result, expected)


def test_atoms_results_write_to_extxyz(llpr):
    structures = _structures()[2:5]
    results = evaluate(
        llpr,
        structures,
        device="cpu",
        return_atoms=True,
        properties=[
            "energy",
            "forces",
            "stress",
            "energy_uncertainty",
            "energies_uncertainty",
            "forces_ensemble",
        ],
    )
    plain = evaluate(llpr, structures, device="cpu")
    assert all(a is not b for a, b in zip(results, structures, strict=True))
    assert structures[0].calc is None  # the inputs are not touched
    text = io.StringIO()
    ase.io.write(text, results, format="extxyz")
    text.seek(0)
    read = ase.io.read(text, index=":", format="extxyz")
    for atoms, expected in zip(read, plain, strict=True):
        energy = atoms.get_potential_energy()
        assert energy == pytest.approx(expected["energy"], abs=1e-8)
        np.testing.assert_allclose(atoms.get_forces(), expected["forces"], atol=1e-8)
        assert atoms.info["energy_uncertainty"] == pytest.approx(
            expected["energy_uncertainty"], abs=1e-8
        )
        np.testing.assert_allclose(
            atoms.arrays["energies_uncertainty"],
            expected["energies_uncertainty"],
            atol=1e-8,
        )
        assert atoms.arrays["forces_ensemble"].shape == (len(atoms), 3 * MEMBERS)
    np.testing.assert_allclose(read[0].get_stress(), plain[0]["stress"], atol=1e-8)
    with pytest.raises(PropertyNotImplementedError):
        read[1].get_stress()  # the cluster has none


def test_properties_select_the_results(model):
    structures = _structures()[:3]
    results = evaluate(model, structures, device="cpu", properties=["energy"])
    assert [sorted(r) for r in results] == [["energy"]] * 3
    expected = _one_by_one(model, structures)
    assert [r["energy"] for r in results] == pytest.approx(
        [e["energy"] for e in expected], abs=TOLERANCE
    )


def test_bad_input_names_the_structure(model):
    structures = _structures()[:4]
    assert evaluate(model, [], device="cpu") == []

    unknown = [*structures[:2], ase.Atoms("CuAu", positions=[[0, 0, 0], [2.5, 0, 0]])]
    with pytest.raises(UnknownSpeciesError, match="structure 2: .*Au.*Cu, Ag"):
        evaluate(model, unknown, device="cpu")

    broken = structures[3].copy()
    broken.positions[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"structure 1: positions of atoms \[2\]"):
        evaluate(model, [structures[0], broken], device="cpu", batch_size=1)

    zero_cell = ase.Atoms("Cu", cell=np.zeros((3, 3)), pbc=True)
    with pytest.raises(ValueError, match="structure 0: cell direction 0 is periodic"):
        evaluate(model, [zero_cell], device="cpu")

    with pytest.raises(PropertyNotImplementedError, match="energy_uncertainty"):
        evaluate(model, structures, device="cpu", properties=["energy_uncertainty"])
    with pytest.raises(ValueError, match="unknown properties dipole"):
        evaluate(model, structures, device="cpu", properties=["dipole"])
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, structures, device="cpu", batch_size=0)


def test_progress_bar_counts_structures(model, capsys):
    evaluate(model, _structures(), batch_size=4, device="cpu", progress=True)
    assert "9/9" in capsys.readouterr().err
    evaluate(model, _structures(), batch_size=4, device="cpu", progress=False)
    assert capsys.readouterr().err == ""
