"""Tests of `pes_calc.torchsim.PESModel`: the same numbers as `PESCalculator` for
many systems in one call, neighbor-list reuse, torch-sim's own model check, MD."""

import subprocess
import sys
from pathlib import Path

import ase
import ase.build
import numpy as np
import pytest
import torch
from ase import units
from ase.stress import full_3x3_to_voigt_6_stress

ts = pytest.importorskip("torch_sim")

from pes_calc import PESCalculator, build_model  # noqa: E402
from pes_calc.compile import compile_model  # noqa: E402
from pes_calc.neighbors import UnknownSpeciesError  # noqa: E402
from pes_calc.results import has_volume  # noqa: E402
from pes_calc.torchsim import PESModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CU_MODEL = ROOT / "models" / "cu-emt-soap-bpnn.safetensors"
CU_LLPR = ROOT / "models" / "cu-emt-soap-bpnn-llpr.safetensors"
SPECIES = ["Cu", "Ag"]
# an untrained model gives small numbers; scale them so that comparisons mean something
SCALES = [20.0, 30.0]
SMALL = {
    "soap_bpnn": {
        "soap": {"max_angular": 2, "max_radial": 2},
        "bpnn": {"num_hidden_layers": 1, "num_neurons_per_layer": 8},
    },
    "nequip": {"num_layers": 1, "num_features": 4, "l_max": 1},
    "allegro": {
        "num_layers": 1,
        "num_scalar_features": 8,
        "num_tensor_features": 2,
        "l_max": 1,
    },
}
CPU = torch.device("cpu")


def small_model(name: str, species=SPECIES, scales=SCALES):
    return build_model(
        name,
        species,
        seed=0,
        model_dtype="float64",
        per_type_energy_scales=scales,
        **SMALL[name],
    ).eval()


@pytest.fixture(scope="module", params=["soap_bpnn", "nequip"])
def model64(request):
    return small_model(request.param)


def periodic() -> list[ase.Atoms]:
    """Mixed sizes: a sheared 8-atom cell smaller than twice the cutoff, a 4-atom
    cube, one atom, and a 32-atom cell."""
    triclinic = ase.build.bulk("Cu", "fcc", a=3.7) * (2, 2, 2)
    triclinic.symbols[[1, 4, 6]] = "Ag"
    strain = [[0.03, 0.02, -0.04], [0.0, -0.02, 0.05], [0.01, 0.0, 0.04]]
    triclinic.set_cell(
        triclinic.cell.array @ (np.eye(3) + np.array(strain)), scale_atoms=True
    )
    cube = ase.build.bulk("Cu", "fcc", a=3.7, cubic=True)
    cube.symbols[2] = "Ag"
    single = ase.build.bulk("Ag", "fcc", a=4.0)
    large = ase.build.bulk("Cu", "fcc", a=3.65, cubic=True) * (2, 2, 2)
    large.symbols[::5] = "Ag"
    structures = [triclinic, cube, single, large]
    for seed, atoms in enumerate(structures):
        atoms.rattle(0.1, seed=seed)
    return structures


def clusters() -> list[ase.Atoms]:
    """Non-periodic: 4 and 13 atoms, no cell."""
    small = ase.build.bulk("Cu", "fcc", a=3.7, cubic=True)
    small.symbols[2] = "Ag"
    large = ase.Atoms(
        ["Cu"] * 7 + ["Ag"] * 6,
        positions=np.random.default_rng(1).uniform(0, 6, (13, 3)),
    )
    for seed, atoms in enumerate([small, large]):
        atoms.pbc = False
        atoms.cell = np.zeros((3, 3))
        atoms.rattle(0.1, seed=seed)
    return [small, large]


def slabs() -> list[ase.Atoms]:
    """Periodic in x and y only (torch-sim ≥ 0.4 holds pbc per axis)."""
    structures = []
    for seed, size in enumerate([(2, 2, 2), (2, 1, 3)]):
        atoms = ase.build.fcc111("Cu", size, a=3.7, vacuum=4.0)
        atoms.symbols[[0]] = "Ag"
        atoms.rattle(0.1, seed=seed)
        structures.append(atoms)
    return structures


def state_of(structures, dtype=torch.float64, pbc=None):
    """A torch-sim state; ``pbc`` given: a per-axis (3,) tensor, as newer
    torch-sim versions hold it."""
    state = ts.io.atoms_to_state(structures, CPU, dtype)
    if pbc is not None:
        state.pbc = torch.tensor(pbc)
    return state


def reference(calculator: PESCalculator, atoms: ase.Atoms) -> dict:
    atoms = atoms.copy()
    atoms.calc = calculator
    result = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    result["stress"] = atoms.get_stress() if has_volume(atoms) else np.zeros(6)
    if calculator.is_llpr:
        for name in calculator.implemented_properties:
            if "uncertainty" in name or "ensemble" in name:
                result[name] = calculator.get_property(name, atoms)
    return result


def assert_like_calculator(outputs, structures, calculator, rtol):
    """Per-system outputs equal PESCalculator's on each structure alone."""
    start = 0
    for index, atoms in enumerate(structures):
        atoms_slice = slice(start, start + len(atoms))
        start += len(atoms)
        expected = reference(calculator, atoms)
        got = {
            "energy": outputs["energy"][index].item(),
            "forces": outputs["forces"][atoms_slice].numpy(),
            "stress": full_3x3_to_voigt_6_stress(outputs["stress"][index].numpy()),
        }
        if calculator.is_llpr:
            got["energy_uncertainty"] = outputs["energy_uncertainty"][index].item()
            got["energy_ensemble"] = outputs["energy_ensemble"][index].numpy()
            got["energies_uncertainty"] = outputs["energies_uncertainty"][
                atoms_slice
            ].numpy()
            got["forces_uncertainty"] = outputs["forces_uncertainty"][
                atoms_slice
            ].numpy()
            got["forces_ensemble"] = outputs["forces_ensemble"][:, atoms_slice].numpy()
        assert got.keys() <= expected.keys()
        for name, value in got.items():
            scale = np.abs(expected[name]).max(initial=1e-3)
            np.testing.assert_allclose(
                value,
                expected[name],
                rtol=rtol,
                atol=rtol * scale,
                err_msg=f"{name} of structure {index}",
            )


@pytest.mark.parametrize("kind", ["periodic", "clusters", "slabs"])
def test_float64_outputs_equal_the_calculator_per_system(model64, kind):
    structures = {"periodic": periodic, "clusters": clusters, "slabs": slabs}[kind]()
    state = state_of(structures, pbc=[True, True, False] if kind == "slabs" else None)
    outputs = PESModel(model64, device="cpu")(state)
    n_atoms = sum(len(atoms) for atoms in structures)
    assert outputs["energy"].shape == (len(structures),)
    assert outputs["forces"].shape == (n_atoms, 3)
    assert outputs["stress"].shape == (len(structures), 3, 3)
    assert outputs["energies"].shape == (n_atoms,)
    assert all(not value.requires_grad for value in outputs.values())
    calculator = PESCalculator(model64, device="cpu")
    assert_like_calculator(outputs, structures, calculator, rtol=1e-10)
    if kind == "clusters":  # no cell, no stress
        assert not outputs["stress"].any()


def test_float32_outputs_equal_the_float32_calculator(model64):
    structures = periodic()
    outputs = PESModel(model64, device="cpu", dtype="float32")(
        state_of(structures, torch.float32)
    )
    assert outputs["energy"].dtype == torch.float32
    calculator = PESCalculator(model64, device="cpu", dtype="float32")
    assert_like_calculator(outputs, structures, calculator, rtol=1e-5)


def test_allegro_and_a_torchscript_file(tmp_path):
    model = small_model("allegro")
    structures = periodic()[:2]
    state = state_of(structures)
    eager = PESModel(model, device="cpu")(state)
    assert_like_calculator(eager, structures, PESCalculator(model, device="cpu"), 1e-10)
    path = tmp_path / "allegro.pt"
    compile_model(model, path)
    scripted = PESModel(path, device="cpu")(state)
    for name in ("energy", "forces", "stress"):
        torch.testing.assert_close(scripted[name], eager[name], rtol=1e-10, atol=1e-10)


def test_llpr_uncertainties_equal_the_calculator():
    structures = periodic()
    for atoms in structures:  # the shipped model knows copper only
        atoms.symbols[:] = "Cu"
    model = PESModel(CU_LLPR, device="cpu", dtype="float64", ensemble_forces=True)
    assert model.is_llpr
    outputs = model(state_of(structures))
    assert outputs["energy_ensemble"].shape == (len(structures), 16)
    calculator = PESCalculator(
        CU_LLPR, device="cpu", dtype="float64", ensemble_forces=True
    )
    assert_like_calculator(outputs, structures, calculator, rtol=1e-10)
    cheap = PESModel(CU_LLPR, device="cpu", dtype="float64")(state_of(structures))
    assert "energy_uncertainty" in cheap and "forces_uncertainty" not in cheap


def test_neighbor_list_is_reused_for_small_moves_and_rebuilt_for_large():
    model = small_model("soap_bpnn")
    structures = periodic() + periodic()[:1]
    state = state_of(structures)
    reused = PESModel(model, device="cpu", skin=0.5)

    def agree(state):
        fresh = PESModel(model, device="cpu", skin=0.0)(state)
        got = reused(state)
        for name in ("energy", "forces", "stress"):
            torch.testing.assert_close(got[name], fresh[name], rtol=1e-12, atol=1e-12)

    agree(state)
    assert (reused.neighbor_list_builds, reused.neighbor_list_reuses) == (1, 0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):  # small moves, at most 0.24 Å each
        step = torch.rand(
            state.positions.shape, generator=generator, dtype=torch.float64
        )
        state.positions = state.positions + 0.08 * (step - 0.5)
        agree(state)
    assert (reused.neighbor_list_builds, reused.neighbor_list_reuses) == (1, 3)
    built_at = state.positions.clone()
    # one atom moved by whole cell vectors, then all wrapped back into their
    # cells as torch-sim's integrators do: the same list, with corrected shifts
    state.positions[0] += state.cell[0] @ torch.tensor([2.0, -1.0, 1.0]).double()
    agree(state)
    state.positions = ts.transforms.pbc_wrap_batched(
        state.positions, state.cell, state.system_idx
    )
    agree(state)
    jumped = torch.linalg.vector_norm(state.positions - built_at, dim=1) > 1.0
    assert jumped.sum() > 1  # atom 0 and atoms rattled out of their cell
    assert (reused.neighbor_list_builds, reused.neighbor_list_reuses) == (1, 5)
    state.positions[3] += 0.3  # 0.52 Å from where the list was built
    agree(state)
    assert reused.neighbor_list_builds == 2
    state.cell = state.cell * 1.01  # a new cell rebuilds
    agree(state)
    assert reused.neighbor_list_builds == 3
    other = state_of(periodic()[:2])  # so do other atoms
    agree(other)
    assert reused.neighbor_list_builds == 4


def test_state_dicts_and_switches():
    model = small_model("soap_bpnn")
    structures = periodic()[:2]
    state = state_of(structures)
    expected = PESModel(model, device="cpu")(state)
    fields = ("positions", "cell", "pbc", "atomic_numbers", "system_idx")
    as_dict = {name: getattr(state, name) for name in fields}
    got = PESModel(model, device="cpu")(as_dict)
    torch.testing.assert_close(got["forces"], expected["forces"])
    energy_only = PESModel(model, device="cpu", compute_stress=False)
    energy_only.compute_forces = False
    assert set(energy_only(state)) == {"energy", "energies"}
    shared = PESModel(PESCalculator(model, device="cpu"))
    torch.testing.assert_close(shared(state)["stress"], expected["stress"])
    # a float32 state runs in the model's float64 and gets float32 back
    cast = PESModel(model, device="cpu")(state_of(structures, torch.float32))
    assert cast["forces"].dtype == torch.float32
    torch.testing.assert_close(cast["energy"], expected["energy"].float())


def test_unknown_elements_and_bad_positions_are_named():
    model = PESModel(small_model("soap_bpnn"), device="cpu")
    nickel = ase.build.bulk("Ni", "fcc", a=3.5)
    with pytest.raises(UnknownSpeciesError, match="Ni.*Cu, Ag"):
        model(state_of([periodic()[0], nickel]))
    state = state_of(periodic()[:2])
    state.positions[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(state)


def test_torch_sim_model_validator():
    from torch_sim.models.interface import validate_model_outputs

    # its test systems: Si, Fe (torch-sim 0.3) and Mg (later versions)
    model = small_model("soap_bpnn", ["Mg", "Si", "Fe"], scales=[5.0, 5.0, 5.0])
    validate_model_outputs(PESModel(model, device="cpu"), CPU, torch.float64)


def copper_cells(count: int, seed: int) -> list[ase.Atoms]:
    """Rattled, slightly strained 32-atom Cu cells with 300 K velocities."""
    rng = np.random.default_rng(seed)
    structures = []
    for _ in range(count):
        atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 2, 2)
        strain = np.eye(3) + 0.01 * rng.standard_normal((3, 3))
        atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        # Maxwell-Boltzmann momenta, amu·Å/(ASE time unit), as ASE draws them
        width = np.sqrt(atoms.get_masses() * units.kB * 300)[:, None]
        atoms.set_momenta(width * rng.standard_normal((len(atoms), 3)))
        structures.append(atoms)
    return structures


def run_nve(model, structures, steps: int, dt_fs: float = 2.0):
    """torch-sim's velocity Verlet from the structures' own momenta (ASE's
    momentum unit is torch-sim's); total energy per system after every step."""
    state = state_of(structures)
    kT = torch.tensor(0.0, dtype=torch.float64)
    dt = torch.tensor(dt_fs * units.fs, dtype=torch.float64)
    if hasattr(ts, "nve_step"):  # torch-sim ≥ 0.4: functions
        md = ts.nve_init(state, model, kT=kT)

        def step(md):
            return ts.nve_step(md, model, dt=dt)
    else:  # torch-sim 0.3: an (init, update) pair of closures
        init, step = ts.integrators.nve(model=model, dt=dt, kT=kT)
        md = init(state)
    md.momenta = torch.tensor(
        np.concatenate([atoms.get_momenta() for atoms in structures])
    )
    totals = []
    for _ in range(steps):
        md = step(md)
        kinetic = torch.zeros(len(structures), dtype=torch.float64).index_add(
            0, md.system_idx, 0.5 * (md.momenta**2).sum(1) / md.masses
        )
        totals.append(md.energy + kinetic)
    return md, torch.stack(totals)


@pytest.fixture(scope="module")
def copper64():
    return PESModel(CU_MODEL, device="cpu", dtype="float64")


def test_nve_of_eight_systems_conserves_energy(copper64):
    structures = copper_cells(8, seed=0)
    md, totals = run_nve(copper64, structures, steps=60)
    drift = (totals - totals[0]).abs().max(dim=0).values / 32  # eV/atom
    # 2 fs steps of a trained model: at most 6e-5 eV/atom here, against kinetic
    # energies of ~0.04 eV/atom
    assert drift.max() < 2e-4, drift
    assert copper64.neighbor_list_reuses > 5 * copper64.neighbor_list_builds


def test_batched_trajectory_equals_a_one_system_trajectory(copper64):
    structures = copper_cells(3, seed=1)
    batched, _ = run_nve(copper64, structures, steps=15)
    alone, _ = run_nve(copper64, structures[1:2], steps=15)
    mine = batched.system_idx == 1
    torch.testing.assert_close(
        batched.positions[mine], alone.positions, rtol=0, atol=1e-10
    )
    torch.testing.assert_close(batched.momenta[mine], alone.momenta, rtol=0, atol=1e-10)


def test_import_pes_calc_leaves_torch_sim_alone_and_a_missing_extra_says_so():
    script = (
        "import sys\n"
        "import pes_calc\n"
        "assert not any(m.split('.')[0] == 'torch_sim' for m in sys.modules)\n"
        "sys.modules['torch_sim'] = None\n"
        "try:\n"
        "    import pes_calc.torchsim\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert 'pip install -e ".[torchsim]"' in done.stdout
