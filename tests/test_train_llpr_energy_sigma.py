"""`pes-calc train` with architecture llpr: after ensemble training the energy σ is
chosen (analytic or ensemble spread) by the validation NLL and stored; a
calibration-only run keeps the analytic σ, as before."""

import math

import ase.io
import pytest
import torch
from helpers import emt_structures

from pes_calc import build_model, keys, save_model
from pes_calc.io import load_model, read_metadata
from pes_calc.train import train
from pes_calc.train.data import LabelKeys, load_graphs
from pes_calc.train.llpr import gaussian_nll, raw_energy_errors


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cu-llpr-energy-sigma")
    ase.io.write(folder / "train.xyz", emt_structures(10, seed=0), format="extxyz")
    ase.io.write(folder / "val.xyz", emt_structures(6, seed=1), format="extxyz")
    ase.io.write(folder / "test.xyz", emt_structures(3, seed=2), format="extxyz")
    model = build_model(
        "soap_bpnn",
        ["Cu"],
        soap={
            "max_angular": 1,
            "max_radial": 2,
            "cutoff": {"radius": 3.5, "width": 0.5},
        },
        bpnn={"num_hidden_layers": 1, "num_neurons_per_layer": 6},
        model_dtype="float64",
        seed=1,
        per_type_energy_shifts=-0.01,
        per_type_energy_scales=0.3,
    )
    save_model(model, folder / "base.safetensors")
    return folder


def config(data, **training):
    return {
        "seed": 5,
        "data": {key: str(data / f"{key}.xyz") for key in ("train", "val", "test")},
        "architecture": {
            "name": "llpr",
            "model": {"num_ensemble_members": {"energy": 4}},
            "training": {
                "model_checkpoint": str(data / "base.safetensors"),
                "batch_size": 3,
                **training,
            },
        },
    }


def test_calibration_only_keeps_the_analytic_energy_sigma(data, tmp_path):
    train(config(data), tmp_path, progress=False)
    model = load_model(tmp_path / "model.safetensors")
    settings = read_metadata(tmp_path / "model.safetensors")["llpr"]
    assert "energy_uncertainty" not in settings
    assert float(model.state.analytic_energy_weight) == 1.0
    assert float(model.state.ensemble_energy_multiplier) == 0.0


def test_ensemble_training_chooses_the_energy_sigma_by_validation_nll(data, tmp_path):
    result = train(
        config(data, num_epochs=3, learning_rate=0.05), tmp_path, progress=False
    )
    model = load_model(result.model_path)
    settings = read_metadata(result.model_path)["llpr"]
    scores = settings["energy_validation_nll"]
    chosen = settings["energy_uncertainty"]
    assert set(scores) == {"analytic", "ensemble"}
    assert chosen == min(scores, key=scores.get)
    # the stored choice is what the file computes: its σ on val.xyz meet the
    # run's condition (absolute residuals) and give the recorded NLL
    val = load_graphs(
        data / "val.xyz", model.species, model.cutoff, LabelKeys(), torch.float64
    )
    residuals, sigmas = [], []
    for graph in val:
        outputs = model(graph, False, False)
        residuals.append(outputs[keys.ENERGY] - graph.properties[keys.ENERGY])
        sigmas.append(outputs[keys.ENERGY_UNCERTAINTY])
    residuals, sigmas = torch.cat(residuals).detach(), torch.cat(sigmas).detach()
    assert math.sqrt(math.pi / 2) * float(
        torch.mean(residuals.abs() / sigmas)
    ) == pytest.approx(1.0, rel=1e-9)
    assert gaussian_nll(residuals, sigmas) == pytest.approx(scores[chosen], rel=1e-9)
    if chosen == "ensemble":
        assert float(model.state.analytic_energy_weight) == 0.0
        assert settings["energy_ensemble_multiplier"] == pytest.approx(
            float(model.state.ensemble_energy_multiplier)
        )
    # both candidates were each calibrated by the same method before comparing
    for source in ("analytic", "ensemble"):
        raw_residuals, raw_sigmas = raw_energy_errors(model, val, source=source)
        factor = math.sqrt(math.pi / 2) * float(
            torch.mean(raw_residuals.abs() / raw_sigmas)
        )
        assert gaussian_nll(raw_residuals, factor * raw_sigmas) == pytest.approx(
            scores[source], rel=1e-9
        )
