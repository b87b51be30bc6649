"""`pes_calc.md.run_md` and `pes-calc md`: integrators, files, observers, errors."""

import ase
import ase.build
import ase.io
import numpy as np
import pytest
from ase import units
from click.testing import CliRunner

import pes_calc.md as md
from pes_calc import PESCalculator, build_model, save_model
from pes_calc.cli import main
from pes_calc.md import StopMD, run_md

TINY = {"soap": {"max_angular": 2, "max_radial": 2}}


@pytest.fixture(scope="module")
def model():
    """Tiny untrained Cu model, float64; energies ×100 for realistic forces.

    Unscaled, this model's forces on a rattled cell are ~0.005 eV/Å, too weak for
    dynamics to tell a right integrator from a wrong one; ×100 gives ~0.5 eV/Å.
    """
    return build_model(
        "soap_bpnn",
        ["Cu"],
        **TINY,
        seed=0,
        model_dtype="float64",
        per_type_energy_scales=100.0,
    )


def fcc(repeat=1, rattle=0.05):
    """Cubic fcc Cu (4 atoms × repeat³), optionally rattled."""
    atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True) * (repeat, repeat, repeat)
    if rattle:
        atoms.rattle(rattle, seed=1)
    return atoms


def calc(model):
    return PESCalculator(model, device="cpu")


class ScaledForces(PESCalculator):
    """A deliberately broken calculator: forces that are not -dE/dr."""

    def calculate(self, *args, **kwargs):
        super().calculate(*args, **kwargs)
        self.results["forces"] = 0.9 * self.results["forces"]


def test_nve_conserves_energy(model):
    kwargs = dict(steps=50, timestep=1.0, temperature=300, seed=0, progress=False)
    good = run_md(calc(model), fcc(2), **kwargs)
    broken = run_md(ScaledForces(model, device="cpu"), fcc(2), **kwargs)
    print(
        f"NVE drift over 50 × 1 fs, 32 atoms, float64: {good.energy_drift_per_atom:.2e}"
        f" eV/atom (forces × 0.9: {broken.energy_drift_per_atom:.2e})"
    )
    assert good.steps == 50 and good.completed
    assert good.final_temperature > 100  # atoms moved: the test measures something
    # measured 1.6e-6 here; scaled forces give 2e-3
    assert good.energy_drift_per_atom < 2e-5
    assert broken.energy_drift_per_atom > 100 * good.energy_drift_per_atom


def test_nve_drift_scales_with_timestep_squared(model):
    drifts = [
        run_md(
            calc(model), fcc(2), steps=int(40 / dt), timestep=dt, seed=0, progress=False
        ).energy_drift_per_atom
        for dt in (1.0, 2.0)
    ]
    print(f"NVE drift 2 fs / 1 fs: {drifts[1] / drifts[0]:.1f}")
    # velocity Verlet's energy error is O(dt²): ×4 in theory
    assert 2 < drifts[1] / drifts[0] < 16


def test_langevin_heats_a_cold_lattice(model):
    # a perfect lattice at rest has no forces: NVE would stay at 0 K for ever
    temperatures = []

    def record(dynamics):
        temperatures.append(dynamics.atoms.get_temperature())

    atoms = fcc(2, rattle=0)
    summary = run_md(
        calc(model),
        atoms,
        ensemble="nvt",
        temperature=300,
        friction=0.05,
        steps=200,
        init_velocities=False,
        seed=0,
        progress=False,
        observers=[record],
    )
    assert temperatures[0] == 0.0 and len(temperatures) == 201
    mean = np.mean(temperatures[50:])  # friction 0.05/fs: relaxes in ~10 fs
    print(f"Langevin from 0 K to 300 K: mean T over steps 50-200 {mean:.0f} K")
    assert 200 < mean < 400
    assert summary.energy_drift_per_atom is None


def test_bussi_cools_a_hot_cell(model):
    atoms = fcc(2)
    rng = np.random.default_rng(0)
    masses = atoms.get_masses()[:, None]
    atoms.set_momenta(rng.standard_normal((32, 3)) * np.sqrt(masses * units.kB * 1500))
    temperatures = []
    run_md(
        calc(model),
        atoms,
        ensemble="nvt",
        thermostat="bussi",
        temperature=300,
        tdamp=10.0,
        steps=150,
        init_velocities=False,
        seed=0,
        progress=False,
        observers=[(lambda d: temperatures.append(d.atoms.get_temperature()), 5)],
    )
    assert temperatures[0] > 1000
    assert 150 < np.mean(temperatures[-10:]) < 500


def test_velocities_at_the_temperature_without_drift_or_spin(model):
    atoms = fcc(2)
    run_md(calc(model), atoms, temperature=500, steps=0, seed=3, progress=False)
    assert atoms.get_temperature() == pytest.approx(500)
    assert np.allclose(atoms.get_momenta().sum(axis=0), 0, atol=1e-10)
    cluster = ase.Atoms(
        "Cu4", positions=[[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0], [0.3, 0.2, 2.4]]
    )
    run_md(calc(model), cluster, ensemble="nvt", steps=0, seed=3, progress=False)
    assert cluster.get_temperature() == pytest.approx(300)
    assert np.allclose(cluster.get_angular_momentum(), 0, atol=1e-10)
    # same seed, same velocities
    again = fcc(2)
    run_md(calc(model), again, temperature=500, steps=0, seed=3, progress=False)
    assert np.array_equal(again.get_momenta(), atoms.get_momenta())


@pytest.mark.filterwarnings("ignore:NPT thermostat has been moved")
@pytest.mark.parametrize("fallback", [False, True], ids=["mtk", "ase-npt-fallback"])
def test_npt_changes_the_volume(model, monkeypatch, tmp_path, fallback):
    if fallback:
        from ase.md.npt import NPT

        monkeypatch.setattr(md.dynamics, "_npt_class", lambda: NPT)
        pytest.importorskip("ase.md.nose_hoover_chain")  # else that path is the one
    volumes = {}
    for pressure in (0.0, 100.0):
        atoms = fcc(1)
        start = atoms.get_volume()
        summary = run_md(
            calc(model),
            atoms,
            ensemble="npt",
            pressure=pressure,
            steps=30,
            seed=0,
            progress=False,
            log=tmp_path / f"{pressure}.log",
            log_interval=10,
        )
        assert summary.steps == 30
        assert np.isfinite(summary.final_volume)
        assert summary.final_volume == pytest.approx(atoms.get_volume())
        assert abs(summary.final_volume - start) > 1e-4 * start
        volumes[pressure] = summary.final_volume
        table = np.loadtxt(tmp_path / f"{pressure}.log")
        assert table.shape == (4, 7)  # steps 0, 10, 20, 30; with a volume column
        assert table[-1, 6] == pytest.approx(summary.final_volume, rel=1e-6)
    assert volumes[100.0] < volumes[0.0]  # 100 GPa squeezes the cell


def test_trajectory_and_log_files(model, tmp_path):
    for trajectory, log in (("md.traj", "md.log"), ("md.xyz", "md.csv")):
        summary = run_md(
            calc(model),
            fcc(1),
            ensemble="nvt",
            steps=20,
            timestep=2.0,
            seed=0,
            progress=False,
            trajectory=tmp_path / trajectory,
            trajectory_interval=5,
            log=tmp_path / log,
            log_interval=4,
        )
        frames = ase.io.read(tmp_path / trajectory, ":")
        assert len(frames) == 5  # steps 0, 5, 10, 15, 20
        assert frames[-1].get_potential_energy() == pytest.approx(
            calc(model).get_potential_energy(frames[-1])
        )
        assert frames[-1].get_forces().shape == (4, 3)
        if log.endswith(".csv"):
            assert (tmp_path / log).read_text().startswith("step,time_ps,Epot_eV")
            table = np.loadtxt(tmp_path / log, delimiter=",", skiprows=1)
        else:
            table = np.loadtxt(tmp_path / log)
        assert table.shape == (6, 6)
        step, time_ps, potential, kinetic, total, temperature = table.T
        assert step.tolist() == [0, 4, 8, 12, 16, 20]
        assert np.allclose(time_ps, step * 0.002)
        assert np.allclose(total, potential + kinetic, atol=1e-7)
        assert temperature[-1] == pytest.approx(summary.final_temperature, abs=1e-3)


def test_observers_and_stop(model, tmp_path):
    calls = []

    def stop_at_seven(dynamics):
        calls.append(("stop", dynamics.nsteps))
        if dynamics.nsteps == 7:
            raise StopMD("uncertainty too high at step 7")

    summary = run_md(
        calc(model),
        fcc(1),
        steps=20,
        seed=0,
        progress=True,
        observers=[stop_at_seven, (lambda d: calls.append(("every 3", d.nsteps)), 3)],
        trajectory=tmp_path / "t.traj",
        trajectory_interval=7,
    )
    every_3 = [step for name, step in calls if name == "every 3"]
    assert every_3 == [0, 3, 6]  # step 7 stopped the run before this observer
    assert [step for name, step in calls if name == "stop"] == list(range(8))
    assert summary.steps == 7 and summary.requested_steps == 20
    assert not summary.completed
    assert summary.stop_reason == "uncertainty too high at step 7"
    assert "stopped early" in str(summary)
    # the frame of the step that stopped the run is written, the file closed
    assert len(ase.io.read(tmp_path / "t.traj", ":")) == 2


def test_bad_arguments(model):
    cluster = ase.Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]])
    with pytest.raises(ValueError, match="npt needs a cell that is periodic"):
        run_md(calc(model), cluster, ensemble="npt", steps=1, progress=False)
    slab = fcc(1)
    slab.pbc = [True, True, False]
    with pytest.raises(ValueError, match="npt needs"):
        run_md(calc(model), slab, ensemble="npt", steps=1, progress=False)
    with pytest.raises(ValueError, match="unknown ensemble"):
        run_md(calc(model), fcc(1), ensemble="nph", progress=False)
    with pytest.raises(ValueError, match="unknown thermostat"):
        run_md(calc(model), fcc(1), ensemble="nvt", thermostat="berendsen")
    with pytest.raises(ValueError, match="Ag, which this model does not know"):
        run_md(calc(model), fcc(1) + ase.Atoms("Ag", [[1, 1, 1]]), progress=False)
    with pytest.raises(ValueError, match=r"\.traj, \.xyz or \.extxyz"):
        run_md(calc(model), fcc(1), steps=1, trajectory="x.pdb", progress=False)


@pytest.fixture
def files(tmp_path):
    model = build_model("soap_bpnn", ["Cu"], **TINY, seed=0)
    save_model(model, tmp_path / "cu.safetensors")
    ase.io.write(tmp_path / "cu.xyz", [fcc(1), fcc(2)])
    ase.io.write(tmp_path / "cuag.xyz", ase.build.bulk("Ag", "fcc", a=4.1, cubic=True))
    ase.io.write(tmp_path / "cluster.xyz", ase.Atoms("Cu2", [[0, 0, 0], [2.5, 0, 0]]))
    (tmp_path / "bad.safetensors").write_bytes(b"not a model" * 10)
    return tmp_path


def test_cli_md(files):
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "md",
            str(files / "cu.safetensors"),
            str(files / "cu.xyz"),
            "--index",
            "-1",
            "--ensemble",
            "nvt",
            "--steps",
            "10",
            "--temperature",
            "500",
            "--seed",
            "1",
            "--dtype",
            "float64",
            "--trajectory",
            str(files / "md.xyz"),
            "--trajectory-interval",
            "5",
            "--log",
            str(files / "md.log"),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "nvt MD: 32 atoms, 10/10 steps of 1 fs" in result.output
    assert "ms/step" in result.output and "final temperature" in result.output
    assert len(ase.io.read(files / "md.xyz", ":")) == 3
    assert np.loadtxt(files / "md.log").shape == (2, 6)

    result = runner.invoke(
        main,
        [
            "md",
            str(files / "cu.safetensors"),
            str(files / "cu.xyz"),
            "--steps",
            "5",
            "--quiet",
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "nve MD: 4 atoms" in result.output and "energy drift" in result.output


def test_cli_md_compiled_model(files):
    compiled = files / "cu.pt"
    runner = CliRunner()
    result = runner.invoke(
        main, ["compile", str(files / "cu.safetensors"), "-o", str(compiled)]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        main,
        [
            "md",
            str(compiled),
            str(files / "cu.xyz"),
            "--ensemble",
            "npt",
            "--steps",
            "5",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "npt MD: 4 atoms, 5/5 steps" in result.output
    assert "final volume" in result.output


@pytest.mark.parametrize(
    "model_file, structure, extra, message",
    [
        (
            "cu.safetensors",
            "cuag.xyz",
            [],
            "contains Ag, which this model does not know; its species are Cu",
        ),
        (
            "cu.safetensors",
            "cluster.xyz",
            ["--ensemble", "npt"],
            "npt needs a cell that is periodic in all three directions",
        ),
        ("bad.safetensors", "cu.xyz", [], "bad.safetensors"),
        ("cu.safetensors", "cu.safetensors", [], "could not read frame 0 of"),
        ("cu.safetensors", "cu.xyz", ["--index", "5"], "could not read frame 5"),
    ],
    ids=["unknown-element", "npt-cluster", "bad-model", "bad-structure", "bad-index"],
)
def test_cli_md_errors(files, model_file, structure, extra, message):
    result = CliRunner().invoke(
        main,
        [
            "md",
            str(files / model_file),
            str(files / structure),
            "--steps",
            "2",
            "--quiet",
            *extra,
        ],
    )
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # a ClickException, no traceback
    assert message in result.output


def test_the_old_argument_order_still_runs_with_a_warning(model):
    atoms = fcc(1)
    with pytest.warns(DeprecationWarning, match="pass the model first"):
        summary = run_md(atoms, calc(model), steps=2, seed=0, progress=False)
    assert summary.steps == 2 and atoms.calc is not None
