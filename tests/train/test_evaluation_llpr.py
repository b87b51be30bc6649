"""Calibration of LLPR uncertainties in `measure_errors` and ``pes-calc eval``."""

import json
import math

import ase.io
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import emt_structures

from pes_calc import PESCalculator, build_model, save_model
from pes_calc.cli import main
from pes_calc.train.data import LabelKeys, extract_labels, labelled_graphs
from pes_calc.train.evaluation import measure_errors
from pes_calc.train.llpr import wrap

HYPERS = {
    "soap": {
        "max_angular": 2,
        "max_radial": 2,
        "cutoff": {"radius": 4.0, "width": 0.5},
    },
    "bpnn": {"num_neurons_per_layer": 8},
}
CALIBRATION_KEYS = {
    f"{q}_{m}"
    for q in ("energy", "forces")
    for m in ("nll", "mean_squared_z", "spearman", "uncertainty_mean")
}


def graphs(structures, model):
    labels = extract_labels(structures, LabelKeys())
    return labelled_graphs(structures, labels, model.species, model.cutoff)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved float64 SOAP-BPNN (untrained) and its LLPR wrapper (4 members),
    and an EMT-labelled test set with a cluster that has no stress."""
    folder = tmp_path_factory.mktemp("llpr-eval")
    model = build_model("soap_bpnn", ["Cu"], **HYPERS, model_dtype="float64", seed=0)
    save_model(model, folder / "plain.safetensors")
    llpr = wrap(
        model,
        4,
        graphs(emt_structures(12, 0), model),
        graphs(emt_structures(4, 1), model),
    )
    save_model(llpr, folder / "llpr.safetensors")
    ase.io.write(folder / "test.xyz", emt_structures(5, 2))
    return folder


def rank(values):
    """Average ranks by counting, O(n²): an independent check of the numpy ones."""
    values = np.asarray(values)
    below = (values[None, :] < values[:, None]).sum(axis=1)
    equal = (values[None, :] == values[:, None]).sum(axis=1)
    return below + (equal + 1) / 2


def expected_metrics(residuals, sigmas):
    z2 = (residuals / sigmas) ** 2
    rank_sigma, rank_error = rank(sigmas), rank(np.abs(residuals))
    return {
        "nll": np.mean(0.5 * np.log(2 * np.pi * sigmas**2) + 0.5 * z2),
        "mean_squared_z": np.mean(z2),
        "spearman": np.corrcoef(rank_sigma, rank_error)[0, 1],
        "uncertainty_mean": np.mean(sigmas),
    }


def test_cli_eval_json_matches_the_calculator_structure_by_structure(files):
    runner = CliRunner()
    model_path, data = files / "llpr.safetensors", files / "test.xyz"
    result = runner.invoke(main, ["eval", str(model_path), str(data), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert set(metrics) >= CALIBRATION_KEYS

    calculator = PESCalculator(str(model_path), device="cpu", ensemble_forces=True)
    energy_residuals, energy_sigmas, force_residuals, force_sigmas = [], [], [], []
    structures = ase.io.read(data, ":")
    for atoms in structures:
        reference_energy = atoms.get_potential_energy()
        reference_forces = atoms.get_forces()
        atoms.calc = calculator
        energy_residuals.append(atoms.get_potential_energy() - reference_energy)
        energy_sigmas.append(float(calculator.results["energy_uncertainty"]))
        force_residuals.append((atoms.get_forces() - reference_forces).ravel())
        force_sigmas.append(
            np.asarray(calculator.results["forces_uncertainty"]).ravel()
        )
    expected = {
        "energy": expected_metrics(np.array(energy_residuals), np.array(energy_sigmas)),
        "forces": expected_metrics(
            np.concatenate(force_residuals), np.concatenate(force_sigmas)
        ),
    }
    for quantity, values in expected.items():
        for name, value in values.items():
            assert metrics[f"{quantity}_{name}"] == pytest.approx(value, rel=1e-6), (
                quantity,
                name,
            )
    # an untrained model: finite numbers, though far from the ideal ones
    assert all(math.isfinite(metrics[k]) for k in CALIBRATION_KEYS)
    assert metrics["num_structures"] == len(structures)


def test_cli_eval_prints_the_calibration_and_writes_both_plots(files, tmp_path):
    runner = CliRunner()
    plot = tmp_path / "errors.png"
    result = runner.invoke(
        main,
        [
            "eval",
            str(files / "llpr.safetensors"),
            str(files / "test.xyz"),
            "--plot",
            str(plot),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "energy σ" in result.output and "forces σ" in result.output
    assert "Spearman" in result.output
    calibration = tmp_path / "errors-calibration.png"
    assert f"calibration plot: {calibration}" in result.output
    for path in (plot, calibration):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 10_000


def test_models_without_uncertainties_keep_their_output(files, tmp_path):
    runner = CliRunner()
    plot = tmp_path / "errors.png"
    args = ["eval", str(files / "plain.safetensors"), str(files / "test.xyz")]
    result = runner.invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert not CALIBRATION_KEYS & set(json.loads(result.output))
    result = runner.invoke(main, [*args, "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "σ" not in result.output and "calibration" not in result.output
    assert plot.exists() and not (tmp_path / "errors-calibration.png").exists()


def test_without_ensemble_forces_only_the_energy_is_scored(files):
    from pes_calc.io import load_model

    llpr = load_model(files / "llpr.safetensors")
    test = graphs(ase.io.read(files / "test.xyz", ":"), llpr)
    with_forces = measure_errors(llpr, test, dtype=torch.float64).metrics()
    llpr.ensemble_forces = False
    metrics = measure_errors(llpr, test, dtype=torch.float64).metrics()
    assert {k for k in CALIBRATION_KEYS if k in metrics} == {
        k for k in CALIBRATION_KEYS if k.startswith("energy_")
    }
    for key in metrics:
        assert metrics[key] == pytest.approx(with_forces[key], rel=1e-10), key
