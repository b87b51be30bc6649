"""`pes_calc.active` and ``pes-calc active-learn``: the uncertainty-triggered loop
(tiny SOAP-BPNN, EMT copper, 20-step MD: a few seconds per loop)."""

import json
import sys
import types

import ase.build
import ase.io
import numpy as np
import pytest
import yaml
from ase.calculators.emt import EMT
from click.testing import CliRunner
from helpers import emt_structures

from pes_calc import active
from pes_calc.active import (
    ActiveLearningConfigError,
    fingerprint,
    label_structure,
    run_active_learning,
    select,
)
from pes_calc.cli import main
from pes_calc.train.data import LabelKeys

PER_ROUND = 3


class CountingEMT(EMT):
    """EMT that counts the geometries it labels; ``interrupt_at`` (a call number)
    raises KeyboardInterrupt there, ``fail_every`` returns NaN energies on every
    such call."""

    calls = 0
    interrupt_at = None
    fail_every = None

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        if system_changes:
            type(self).calls += 1
            if type(self).calls == type(self).interrupt_at:
                raise KeyboardInterrupt
        super().calculate(atoms, properties, system_changes)
        every = type(self).fail_every
        if every and system_changes and type(self).calls % every == 0:
            self.results["energy"] = float("nan")


@pytest.fixture(scope="module")
def reference():
    """``al_reference:CountingEMT`` importable by the loop, its counters reset."""
    module = types.ModuleType("al_reference")
    module.CountingEMT = CountingEMT
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "al_reference", module)
        yield CountingEMT


@pytest.fixture(autouse=True)
def reset_counter(reference):
    reference.calls, reference.interrupt_at, reference.fail_every = 0, None, None


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cu")
    for name, count, seed in (("train", 6, 0), ("val", 3, 1), ("test", 3, 2)):
        ase.io.write(
            folder / f"{name}.xyz",
            emt_structures(count, seed, cluster=False),
            format="extxyz",
        )
    start = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    ase.io.write(folder / "start.xyz", start, format="extxyz")
    return folder


def make_config(data, max_rounds=2, **sections):
    config = {
        "seed": 0,
        "data": {k: str(data / f"{k}.xyz") for k in ("train", "val", "test")},
        "architecture": {
            "name": "soap_bpnn",
            "model": {
                "soap": {
                    "max_angular": 1,
                    "max_radial": 2,
                    "cutoff": {"radius": 3.5, "width": 0.5},
                },
                "bpnn": {"num_hidden_layers": 1, "num_neurons_per_layer": 8},
            },
            "training": {
                "batch_size": 3,
                "num_epochs": 2,
                "learning_rate": 0.02,
                "loss": {"energy": 1.0, "forces": 1.0, "stress": 1.0},
            },
        },
        "reference": {"calculator": "al_reference:CountingEMT"},
        "retrain": {"mode": "finetune", "training": {"num_epochs": 1}},
        "llpr": {"model": {"num_ensemble_members": {"energy": 4}}},
        "md": {
            "structures": [str(data / "start.xyz")],
            "temperatures": [300, 900],
            "steps": 20,
            "timestep": 2.0,
            "interval": 5,
        },
        # every check is over this threshold: there is always something to label
        "selection": {
            "max_uncertainty": 1e-6,
            "max_per_round": PER_ROUND,
            "min_separation_steps": 5,
        },
        "budget": {"max_rounds": max_rounds},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


class TrainCounter:
    """Wraps the trainer: counts runs per output directory, and can raise in one."""

    def __init__(self, patch, interrupt_in=None):
        self.train, self.runs, self.interrupt_in = active.loop.train, [], interrupt_in
        patch.setattr(active.loop, "train", self)  # the name the loop calls

    def __call__(self, config, outdir, **kwargs):
        self.runs.append(f"{outdir.parent.name}/{outdir.name}")
        if self.interrupt_in and self.runs[-1] == self.interrupt_in:
            raise KeyboardInterrupt
        return self.train(config, outdir, **kwargs)


def mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def loop(data, reference, tmp_path_factory):
    """One round (max_rounds 1), then the same loop raised to two rounds."""
    outdir = tmp_path_factory.mktemp("loop")
    with pytest.MonkeyPatch.context() as patch:
        first_counter = TrainCounter(patch)
        first = run_active_learning(make_config(data, 1), outdir, progress=False)
    first_files = mtimes(outdir / "round-000")
    calls = reference.calls
    with pytest.MonkeyPatch.context() as patch:
        counter = TrainCounter(patch)
        second = run_active_learning(make_config(data, 2), outdir, progress=False)
    return types.SimpleNamespace(
        outdir=outdir,
        first=first,
        second=second,
        first_calls=calls,
        second_calls=reference.calls - calls,
        first_trained=first_counter.runs,
        second_trained=counter.runs,
        first_files=first_files,
    )


def test_two_rounds_write_every_stage_and_the_tables(loop):
    round0, round1 = loop.outdir / "round-000", loop.outdir / "round-001"
    for folder in (round0, round1):
        for name in (
            "train.xyz",
            "base/model.safetensors",
            "llpr/model.safetensors",
            "md/start-300K.json",
            "md/start-900K.log",
            "candidates.xyz",
            "report.json",
            "state.json",
        ):
            assert (folder / name).is_file(), folder / name
    assert (round0 / "labelled.xyz").is_file()
    assert not (round1 / "labelled.xyz").exists()  # the last round labels nothing
    leftovers = [*loop.outdir.rglob("*.tmp"), *loop.outdir.rglob("*partial*")]
    assert not leftovers
    reports = loop.second
    assert [r.round for r in reports] == [0, 1]
    assert [r.stop_reason for r in reports] == [None, "max_rounds"]
    assert reports[0].labelled == PER_ROUND
    assert reports[0].candidates == 10  # 2 runs × 5 checks
    assert reports[0].md_runs == 2 and reports[0].md_steps_requested == 40
    assert reports[0].md_steps_survived == 0  # over the threshold from step 0
    assert reports[0].max_uncertainty > 1e-6
    assert reports[1].test_metrics["forces_rmse"] > 0
    assert "forces_mean_squared_z" in reports[1].test_metrics  # LLPR calibration
    assert json.loads((round1 / "report.json").read_text())["train_size"] == 9
    table = (loop.outdir / "report.md").read_text().splitlines()
    assert len(table) == 4 and table[0].startswith("| round | train | labelled |")
    assert "| max σ (eV/Å) | steps survived: min | all |" in table[0]
    assert table[2].startswith("| 0 | 6 | 3 |") and table[3].startswith("| 1 | 9 | 0 |")
    csv_rows = (loop.outdir / "report.csv").read_text().splitlines()
    assert len(csv_rows) == 3 and "test_forces_rmse" in csv_rows[0]


def test_labels_are_the_references_and_the_training_set_grows_by_them(loop):
    round0, round1 = loop.outdir / "round-000", loop.outdir / "round-001"
    labelled = ase.io.read(round0 / "labelled.xyz", ":")
    assert len(labelled) == PER_ROUND
    for atoms in labelled:
        expected = atoms.copy()
        expected.calc = EMT()
        np.testing.assert_allclose(
            atoms.get_potential_energy(), expected.get_potential_energy(), rtol=1e-10
        )
        np.testing.assert_allclose(atoms.get_forces(), expected.get_forces(), atol=1e-7)
        np.testing.assert_allclose(atoms.get_stress(), expected.get_stress(), atol=1e-7)
        assert atoms.info["temperature_K"] in (300, 900)
        assert "model_energy" not in atoms.info
    candidates = ase.io.read(round0 / "candidates.xyz", ":")
    # model predictions are kept, but never where a label would be read from
    assert all(a.calc is None and "model_forces" in a.arrays for a in candidates)
    # most uncertain first, never two from one run within min_separation_steps
    chosen = [candidates[a.info["candidate_index"]] for a in labelled]
    ranked = sorted(candidates, key=lambda a: -a.info["uncertainty"])
    assert chosen[0].info["uncertainty"] == ranked[0].info["uncertainty"]
    before = ase.io.read(round0 / "train.xyz", ":")
    after = ase.io.read(round1 / "train.xyz", ":")
    assert len(after) == len(before) + len(labelled) == loop.second[1].train_size
    for old, new in zip(before + labelled, after, strict=True):
        np.testing.assert_array_equal(old.positions, new.positions)
        assert old.get_potential_energy() == new.get_potential_energy()


def test_a_rerun_with_more_rounds_goes_on_without_recomputing(loop):
    assert loop.first[0].stop_reason == "max_rounds" and loop.first[0].labelled == 0
    assert loop.first_calls == 0  # the only round was the last: nothing labelled
    assert loop.first_trained == ["round-000/base", "round-000/llpr"]
    assert loop.second_trained == ["round-001/base", "round-001/llpr"]
    assert loop.second_calls == PER_ROUND
    now = mtimes(loop.outdir / "round-000")
    unchanged = {p for p in loop.first_files if now[p] == loop.first_files[p]}
    # round 0's models, data and MD stay; only its report and state are rewritten
    assert set(loop.first_files) - unchanged == {
        loop.outdir / "round-000" / name for name in ("report.json", "state.json")
    }
    # and a rerun of a finished loop does nothing
    reports = run_active_learning(
        make_config_from(loop.outdir), loop.outdir, progress=False
    )
    assert [r.wall_time_s for r in reports] == [r.wall_time_s for r in loop.second]


def make_config_from(outdir):
    return yaml.safe_load((outdir / "config.yaml").read_text())


def test_cli_prints_the_table_of_a_finished_loop(loop, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(make_config_from(loop.outdir)))
    result = CliRunner().invoke(
        main, ["active-learn", str(path), "-o", str(loop.outdir), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert "| 1 | 9 | 0 |" in result.output and "stopped: max_rounds" in result.output


def test_interrupted_labelling_and_training_resume_without_relabelling(
    data, reference, tmp_path
):
    config = make_config(data, 2)
    reference.interrupt_at = 2  # Ctrl-C while labelling the second structure
    with pytest.raises(KeyboardInterrupt):
        run_active_learning(config, tmp_path, progress=False)
    partial = tmp_path / "round-000" / "labelled.partial.xyz"
    assert len(ase.io.read(partial, ":")) == 1
    assert not (tmp_path / "round-000" / "labelled.xyz").exists()
    text = partial.read_text()
    partial.write_text(text + text[: len(text) // 2])  # as if killed mid-write

    reference.interrupt_at = None
    with pytest.MonkeyPatch.context() as patch:
        counter = TrainCounter(patch, interrupt_in="round-001/base")
        with pytest.raises(KeyboardInterrupt):
            run_active_learning(config, tmp_path, progress=False)
    assert counter.runs == ["round-001/base"]  # round 0 was not trained again
    # the structure labelled before Ctrl-C was kept: two new labels, one redone
    assert reference.calls == 2 + (PER_ROUND - 1)
    labelled = tmp_path / "round-000" / "labelled.xyz"
    assert len(ase.io.read(labelled, ":")) == PER_ROUND and not partial.exists()
    stamp = labelled.stat().st_mtime_ns

    reports = run_active_learning(config, tmp_path, progress=False)
    assert reference.calls == 2 + (PER_ROUND - 1)
    assert labelled.stat().st_mtime_ns == stamp
    assert [r.train_size for r in reports] == [6, 6 + PER_ROUND]


def test_failed_labels_are_reported_and_the_budget_caps_labels(
    data, reference, tmp_path, capsys
):
    reference.fail_every = 2  # every second structure comes back with a NaN energy
    config = make_config(data, 4, budget={"max_labels": 2})
    reports = run_active_learning(config, tmp_path, progress=True)
    # round 0: cap min(3, 2) = 2 chosen, one failed; round 1 fills the budget
    assert (reports[0].labelled, reports[0].label_failures) == (1, 1)
    assert "failed (FloatingPointError: the reference returned non-finite energy)" in (
        capsys.readouterr().out
    )
    assert reports[1].labelled == 1 and reports[1].train_size == 7
    assert reports[-1].stop_reason == "max_labels" and len(reports) == 3
    files = tmp_path.glob("round-*/labelled.xyz")
    assert sum(len(ase.io.read(path, ":")) for path in files) == 2


def test_a_loop_whose_md_stays_below_the_threshold_has_converged(
    data, reference, tmp_path
):
    config = make_config(data, 3, selection={"max_uncertainty": 1e9})
    reports = run_active_learning(config, tmp_path, progress=False)
    assert len(reports) == 1 and reports[0].stop_reason == "converged"
    assert reports[0].md_runs_clean == 2 and reports[0].md_steps_survived == 40
    assert reference.calls == 0
    assert not (tmp_path / "round-000" / "labelled.xyz").exists()


def candidate(positions, run, step, uncertainty, cell=5.0):
    atoms = ase.Atoms("Cu2", positions=positions, cell=np.eye(3) * cell, pbc=True)
    atoms.info.update(md_run=run, md_step=step, uncertainty=uncertainty)
    return atoms


def test_selection_takes_the_most_uncertain_and_skips_near_duplicates():
    base = [[0, 0, 0], [2.5, 0.1, 0]]
    shifted = [[1.0, 1.0, 1.0], [1.1, 3.5, 1.0]]  # the same two distances, permuted
    candidates = [
        candidate(base, "a", 0, 0.5),
        candidate(shifted, "b", 0, 0.6),  # a duplicate of the first (fingerprint)
        candidate([[0, 0, 0], [2.2, 0, 0]], "a", 10, 0.9),
        candidate([[0, 0, 0], [2.3, 0, 0]], "a", 30, 0.8),  # within 50 steps of 10
        candidate([[0, 0, 0], [2.4, 0, 0]], "a", 100, float("nan")),  # broken: last
    ]
    settings = {
        "max_per_run": None,
        "min_separation_steps": 50,
        "duplicate_tolerance": 0.01,
    }
    assert select(candidates, 10, settings) == [2, 1, 4]
    assert select(candidates, 1, settings) == [2]
    assert select(candidates, 10, {**settings, "max_per_run": 1}) == [2, 1]
    every_step = {**settings, "min_separation_steps": 1}
    assert select(candidates, 10, every_step) == [2, 3, 1, 4]
    first, second = fingerprint(candidates[0]), fingerprint(candidates[1])
    np.testing.assert_allclose(first[1], second[1], atol=1e-12)


def test_label_structure_drops_model_values_and_rejects_non_finite_results():
    atoms = emt_structures(1, 0, cluster=False)[0]  # carries EMT results: not labels
    atoms.info["model_energy"] = 1.0
    keys = LabelKeys("REF_energy", "REF_forces", None)
    labelled = label_structure(atoms, EMT(), keys)
    expected = atoms.copy()
    expected.calc = EMT()
    assert labelled.calc is None and "model_energy" not in labelled.info
    assert labelled.info["REF_energy"] == pytest.approx(expected.get_potential_energy())
    np.testing.assert_allclose(labelled.arrays["REF_forces"], expected.get_forces())
    assert "stress" not in labelled.info

    class Broken(EMT):
        def calculate(self, *args, **kwargs):
            super().calculate(*args, **kwargs)
            self.results["forces"][0, 0] = np.inf

    with pytest.raises(FloatingPointError, match="non-finite forces"):
        label_structure(atoms, Broken(), LabelKeys())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"selection": {"max_uncertainty": 0.1, "treshold": 1}},
            "unknown selection keys",
        ),
        ({"md_steps": 10}, "unknown top-level keys"),
        (
            {"reference": {"calculator": "no_such_package.calc:Calc"}},
            "cannot import 'no_such_package.calc'",
        ),
        (
            {"reference": {"calculator": "ase.calculators.emt:EMTT"}},
            "has no class 'EMTT'",
        ),
        ({"reference": {}}, "reference.calculator must name"),
        ({"retrain": "warm"}, "retrain.mode must be one of"),
        (
            {"llpr": {"model": {"num_ensemble_members": {"energy": 0}}}},
            "needs llpr.model.num_ensemble_members",
        ),
        ({"selection": {"max_uncertainty": None}}, "max_uncertainty must be a number"),
        (
            {"md": {"structures": ["nowhere/*.xyz"], "temperatures": [300]}},
            "no file matches nowhere",
        ),
        (
            {"architecture": {"name": "soap_bpnn", "training": {"num_epoch": 3}}},
            "^unknown training keys",
        ),
        ({"retrain": {"training": {"num_epoch": 3}}}, "^retrain: unknown training"),
        ({"llpr": {"training": {"num_epochs": 0}}}, "^llpr: num_epochs must be"),
        ({"budget": {"max_rounds": 0}}, "budget.max_rounds must be an integer > 0"),
        (
            {"md": {"structures": ["x"], "temperatures": [300], "timestep": "2 fs"}},
            r"md.timestep must be a number > 0, got '2 fs'",
        ),
    ],
)
def test_config_errors_are_clear(data, change, message):
    config = make_config(data)
    config.update(change)
    with pytest.raises(ActiveLearningConfigError, match=message):
        active.normalise(config)


def test_cli_reports_config_errors_and_a_changed_config(loop, tmp_path):
    config = make_config_from(loop.outdir)
    config["reference"] = {"calculator": "no_such_package:Calc"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["active-learn", str(path), "-o", str(tmp_path)])
    assert result.exit_code == 1 and "cannot import 'no_such_package'" in result.output
    config = make_config_from(loop.outdir)
    config["selection"]["max_per_round"] = 5
    with pytest.raises(ActiveLearningConfigError, match="only budget may change"):
        run_active_learning(config, loop.outdir, progress=False)
