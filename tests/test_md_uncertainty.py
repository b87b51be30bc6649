"""`pes_calc.md.UncertaintyWatch` and `pes-calc md --max-uncertainty`: LLPR-aware MD."""

import math

import ase.build
import ase.io
import numpy as np
import pytest
from ase import units
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.emt import EMT
from ase.md.verlet import VelocityVerlet
from click.testing import CliRunner
from helpers import emt_structures

from pes_calc import PESCalculator, build_model, save_model
from pes_calc.cli import main
from pes_calc.md import StopMD, UncertaintyWatch, run_md
from pes_calc.train.data import LabelKeys, extract_labels, labelled_graphs
from pes_calc.train.llpr import wrap

HYPERS = {
    "soap": {
        "max_angular": 2,
        "max_radial": 2,
        "cutoff": {"radius": 4.0, "width": 0.5},
    },
    "bpnn": {"num_neurons_per_layer": 8},
}
STEPS = 20


def small_model():
    return build_model("soap_bpnn", ["Cu"], **HYPERS, model_dtype="float64", seed=0)


def llpr_of(model, members):
    """``model`` wrapped in LLPR, fitted on EMT-labelled Cu cells (float64)."""

    def graphs(structures):
        labels = extract_labels(structures, LabelKeys())
        return labelled_graphs(structures, labels, ["Cu"], model.cutoff)

    return wrap(
        model, members, graphs(emt_structures(12, 0)), graphs(emt_structures(4, 1))
    )


@pytest.fixture(scope="module")
def llpr():
    """Untrained 8-feature SOAP-BPNN with 4 ensemble members: cheap checks."""
    return llpr_of(small_model(), 4)


def cell():
    atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.rattle(0.05, seed=1)
    return atoms


def md(model, observers, steps=STEPS, **kwargs):
    """A seeded 4-atom NVE run at 600 K (same trajectory for the same checks)."""
    return run_md(
        PESCalculator(model, device="cpu"),
        cell(),
        steps=steps,
        seed=0,
        temperature=600,
        progress=False,
        observers=observers,
        **kwargs,
    )


def measured(history, measure):
    """The watch's measure from its history rows (4 atoms)."""
    column = {"forces": 2, "energy": 1, "energy_per_atom": 1}[measure]
    scale = 4 if measure == "energy_per_atom" else 1
    return np.array([row[column] for row in history]) / scale


@pytest.fixture(scope="module")
def reference(llpr, tmp_path_factory):
    """A log-only watch checking every step, and the structure at every step."""
    log = tmp_path_factory.mktemp("reference") / "uncertainty.log"
    structures = []
    watch = UncertaintyWatch(log=log)
    summary = md(llpr, [lambda dyn: structures.append(dyn.atoms.copy()), watch])
    watch.close()
    return watch, structures, summary, log


def test_logged_values_are_the_calculators(llpr, reference):
    watch, structures, summary, log = reference
    assert [step for step, _, _ in watch.history] == list(range(STEPS + 1))
    assert watch.num_checks == STEPS + 1 and summary.completed
    forces_sigma = measured(watch.history, "forces")
    print(f"max force σ {forces_sigma.min():.3f}-{forces_sigma.max():.3f} eV/Å")
    assert np.ptp(forces_sigma) > 1e-3 * forces_sigma.max()  # the structure changed
    for step in (0, STEPS // 2, STEPS):
        atoms = structures[step]
        calc = PESCalculator(llpr, device="cpu")  # fresh: nothing shared with the run
        sigma = calc.get_property("forces_uncertainty", atoms)  # (4, 3)
        per_atom = np.linalg.norm(sigma, axis=1)
        assert per_atom.max() > np.abs(sigma).max()  # a norm, not a component
        _, energy_sigma, force_sigma = watch.history[step]
        assert force_sigma == pytest.approx(per_atom.max(), rel=1e-9)
        assert energy_sigma == pytest.approx(
            calc.get_property("energy_uncertainty", atoms), rel=1e-9
        )
    assert watch.max_seen == forces_sigma.max()
    assert summary.max_uncertainty_seen == forces_sigma.max()
    assert summary.uncertainty_measure == "forces"
    assert summary.first_uncertain_step is None  # no threshold, nothing uncertain
    assert "max uncertainty" in str(summary) and "eV/Å (forces)" in str(summary)
    table = np.loadtxt(log)
    assert log.read_text().startswith(
        "# step time_fs energy_uncertainty_eV max_force_uncertainty_eV/A\n"
    )
    assert table.shape == (STEPS + 1, 4)
    assert np.allclose(table[:, 1], table[:, 0] * 1.0)  # 1 fs steps
    assert np.allclose(table[:, 2:], np.array(watch.history)[:, 1:], rtol=1e-7)


@pytest.mark.parametrize("measure", ["forces", "energy", "energy_per_atom"])
def test_stops_at_the_first_step_over_the_threshold(llpr, reference, measure):
    values = measured(reference[0].history, measure)
    # the first step k ≥ 2 that exceeds all earlier values; threshold just below it
    step = next(k for k in range(2, STEPS + 1) if values[k] > values[:k].max())
    threshold = 0.5 * (values[:step].max() + values[step])
    watch = UncertaintyWatch(threshold, measure=measure)
    summary = md(llpr, [watch])
    assert summary.steps == step and not summary.completed
    assert watch.first_exceeded_step == step and summary.first_uncertain_step == step
    assert watch.num_checks == step + 1
    assert watch.max_seen == pytest.approx(values[step], rel=1e-9)
    assert summary.max_uncertainty_seen == pytest.approx(values[step], rel=1e-9)
    unit = {"forces": "eV/Å", "energy": "eV", "energy_per_atom": "eV/atom"}[measure]
    assert summary.stop_reason == (
        f"{measure} uncertainty {values[step]:.4g} {unit} over max_uncertainty "
        f"{threshold:g} {unit} at step {step}"
    )
    assert len(watch.recorded) == 1  # the structure that stopped the run


def test_no_stop_under_the_threshold_and_checks_every_interval(llpr, reference):
    values = measured(reference[0].history, "forces")
    watch = UncertaintyWatch(1.001 * values.max(), interval=3)
    summary = md(llpr, [watch])  # a bare watch is attached with its interval
    assert summary.completed and summary.steps == STEPS
    assert watch.first_exceeded_step is None and summary.first_uncertain_step is None
    checked_steps = list(range(0, STEPS + 1, 3))
    assert [step for step, _, _ in watch.history] == checked_steps
    assert watch.num_checks == len(checked_steps) and not watch.recorded
    checked = measured(watch.history, "forces")
    assert np.allclose(checked, values[checked_steps], rtol=1e-9)  # same trajectory
    assert summary.max_uncertainty_seen == checked.max()


def test_with_ase_dynamics(llpr):
    def dynamics_with(watch):
        atoms = cell()
        atoms.calc = PESCalculator(llpr, device="cpu")
        dynamics = VelocityVerlet(atoms, timestep=1.0 * units.fs)
        dynamics.attach(watch, 1, dynamics)  # every step: the watch skips
        return dynamics

    watch = UncertaintyWatch(interval=2)
    dynamics_with(watch).run(4)
    assert [step for step, _, _ in watch.history] == [0, 2, 4]
    watch = UncertaintyWatch(0.0)
    with pytest.raises(StopMD, match="at step 0"):  # ASE lets it through
        dynamics_with(watch).run(4)


def test_record_mode(llpr, reference, tmp_path):
    values = measured(reference[0].history, "forces")
    structures = reference[1]
    threshold = float(np.median(values))
    uncertain = [step for step in range(STEPS + 1) if values[step] > threshold]
    assert 0 < len(uncertain) < STEPS + 1
    path = tmp_path / "uncertain.xyz"
    ase.io.write(path, ase.build.bulk("Cu"))  # appended to, not overwritten
    with UncertaintyWatch(threshold, on_uncertain="record", record_to=path) as watch:
        summary = md(llpr, [watch])
    assert summary.completed and summary.first_uncertain_step == uncertain[0]
    assert watch.first_exceeded_step == uncertain[0]
    assert [atoms.info["step"] for atoms in watch.recorded] == uncertain
    frames = ase.io.read(path, ":")
    assert len(frames) == 1 + len(uncertain)
    reference_calc = PESCalculator(llpr, device="cpu")
    for atoms, frame, step in zip(watch.recorded, frames[1:], uncertain, strict=True):
        assert atoms.info["uncertainty"] == pytest.approx(values[step], rel=1e-9)
        assert atoms.info["uncertainty_measure"] == "forces"
        assert np.allclose(atoms.positions, structures[step].positions, atol=1e-12)
        energy = reference_calc.get_potential_energy(structures[step])
        assert atoms.get_potential_energy() == pytest.approx(energy, rel=1e-9)
        assert np.allclose(
            atoms.get_forces(), reference_calc.get_forces(structures[step]), atol=1e-9
        )
        assert frame.info["step"] == step
        assert frame.info["uncertainty"] == pytest.approx(values[step], rel=1e-9)
        assert np.allclose(frame.positions, atoms.positions, atol=1e-6)
        assert frame.get_potential_energy() == pytest.approx(energy, rel=1e-9)
        assert np.allclose(frame.get_forces(), atoms.get_forces(), atol=1e-6)


def test_needs_an_llpr_model():
    plain = small_model()
    for calc in (PESCalculator(plain, device="cpu"), EMT()):
        with pytest.raises(PropertyNotImplementedError, match="needs an LLPR model"):
            run_md(
                calc, cell(), steps=2, progress=False, observers=[UncertaintyWatch(1.0)]
            )
    # without ensemble members there is no force uncertainty; energy still works
    no_ensemble = llpr_of(small_model(), 0)
    with pytest.raises(PropertyNotImplementedError, match="with ensemble members"):
        md(no_ensemble, [UncertaintyWatch(1.0)], steps=2)
    watch = UncertaintyWatch(measure="energy")
    summary = md(no_ensemble, [watch], steps=2)
    assert summary.completed and watch.num_checks == 3
    assert all(math.isnan(force) and energy > 0 for _, energy, force in watch.history)
    # no watch, no uncertainty fields
    summary = run_md(
        PESCalculator(plain, device="cpu"), cell(), steps=0, progress=False
    )
    assert summary.max_uncertainty_seen is None and summary.uncertainty_measure is None
    assert "uncertainty" not in str(summary)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"measure": "stress"}, "unknown uncertainty measure 'stress'"),
        ({"on_uncertain": "pause"}, "unknown on_uncertain 'pause'"),
        ({"interval": 0}, "interval must be ≥ 1"),
        ({"interval": 2.5}, "interval must be an integer"),
        ({"max_uncertainty": -0.1}, "max_uncertainty must be ≥ 0"),
        ({"max_uncertainty": math.nan}, "max_uncertainty must be ≥ 0"),
        ({"record_to": "u.traj"}, r"use a \.xyz or \.extxyz file"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UncertaintyWatch(**kwargs)


def test_cli_md_max_uncertainty(llpr, tmp_path):
    save_model(llpr, tmp_path / "llpr.safetensors")
    ase.io.write(tmp_path / "cu.xyz", cell())
    base = [
        "md",
        str(tmp_path / "llpr.safetensors"),
        str(tmp_path / "cu.xyz"),
        "--quiet",
        "--seed",
        "0",
        "--steps",
        "4",
    ]
    runner = CliRunner()
    # every structure is over 0: stop at step 0
    result = runner.invoke(main, [*base, "--max-uncertainty", "0"])
    assert result.exit_code == 0, result.output
    assert "0/4 steps" in result.output
    assert "stopped early      forces uncertainty" in result.output
    assert "over max_uncertainty 0 eV/Å at step 0" in result.output

    run = tmp_path / "run"
    run.mkdir()
    result = runner.invoke(
        main,
        [
            *base,
            "--max-uncertainty",
            "0",
            "--on-uncertain",
            "record",
            "--uncertainty-interval",
            "2",
            "--uncertainty-measure",
            "energy",
            "--trajectory",
            str(run / "md.xyz"),
            "--uncertainty-log",
            str(run / "u.log"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "4/4 steps" in result.output
    assert "3 structures appended to" in result.output
    frames = ase.io.read(run / "uncertain.xyz", ":")  # next to the trajectory
    assert [frame.info["step"] for frame in frames] == [0, 2, 4]
    table = np.loadtxt(run / "u.log")
    assert table[:, 0].tolist() == [0, 2, 4]
    assert [frame.info["uncertainty"] for frame in frames] == pytest.approx(
        table[:, 2], rel=1e-6
    )
    assert f"max uncertainty    {table[:, 2].max():.4g} eV (energy)" in result.output


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-uncertainty", "0.1"], "--max-uncertainty needs an LLPR model"),
        (
            ["--uncertainty-log", "u.log", "--uncertainty-interval", "5"],
            "--uncertainty-interval, --uncertainty-log need an LLPR model",
        ),
        (["--on-uncertain", "record"], "--on-uncertain needs --max-uncertainty"),
    ],
)
def test_cli_md_uncertainty_errors(tmp_path, extra, message):
    save_model(small_model(), tmp_path / "plain.safetensors")
    ase.io.write(tmp_path / "cu.xyz", cell())
    result = CliRunner().invoke(
        main,
        [
            "md",
            str(tmp_path / "plain.safetensors"),
            str(tmp_path / "cu.xyz"),
            "--steps",
            "2",
            "--quiet",
            *extra,
        ],
    )
    assert result.exit_code == 2, result.output  # a usage error, no traceback
    assert message in result.output
