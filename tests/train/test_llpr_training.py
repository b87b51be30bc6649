"""`pes-calc train` with architecture llpr: wrapping, calibration, ensemble NLL."""

import json
import math

import ase.io
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import emt_structures

from pes_calc import build_model, keys, save_model
from pes_calc.calculator import PESCalculator
from pes_calc.cli import main
from pes_calc.io import load_model, read_metadata
from pes_calc.train import TrainingConfigError, train
from pes_calc.train.data import LabelKeys, load_graphs
from pes_calc.train.llpr import (
    calibration_factor,
    fit_covariance,
    raw_energy_errors,
    raw_force_errors,
    wrap,
)
from pes_calc.train.llpr_ensemble import LinearisedEnsemble, linearise
from pes_calc.train.losses import EnsembleNLLLoss, ensemble_loss_from_config

TINY_SOAP = {
    "soap": {
        "max_angular": 1,
        "max_radial": 2,
        "cutoff": {"radius": 3.5, "width": 0.5},
    },
    "bpnn": {"num_hidden_layers": 1, "num_neurons_per_layer": 6},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cu-llpr")
    ase.io.write(folder / "train.xyz", emt_structures(10, seed=0), format="extxyz")
    ase.io.write(folder / "val.xyz", emt_structures(4, seed=1), format="extxyz")
    ase.io.write(folder / "test.xyz", emt_structures(3, seed=2), format="extxyz")
    model = build_model(
        "soap_bpnn",
        ["Cu"],
        **TINY_SOAP,
        model_dtype="float64",
        seed=1,
        per_type_energy_shifts=-0.01,
        per_type_energy_scales=0.3,
    )
    save_model(model, folder / "base.safetensors")
    return folder


def llpr_config(data, members=4, **training):
    return {
        "seed": 5,
        "data": {key: str(data / f"{key}.xyz") for key in ("train", "val", "test")},
        "architecture": {
            "name": "llpr",
            "model": {"num_ensemble_members": {"energy": members}},
            "training": {
                "model_checkpoint": str(data / "base.safetensors"),
                "batch_size": 3,
                **training,
            },
        },
    }


def graphs(data, name, model):
    return load_graphs(
        data / f"{name}.xyz", model.species, model.cutoff, LabelKeys(), torch.float64
    )


def test_calibration_only_run_writes_a_calibrated_llpr_model(data, tmp_path):
    result = train(llpr_config(data), tmp_path, progress=False)
    model = load_model(tmp_path / "model.safetensors")
    settings = read_metadata(tmp_path / "model.safetensors")["llpr"]
    assert settings["num_ensemble_members"] == {"energy": 4}
    assert settings["calibration_method"] == "absolute_residuals"
    # α is √(π/2) mean(|r|/σ_raw) over the validation structures, recomputed here
    alpha = model.state.multiplier.item()
    model.state.multiplier.fill_(1.0)
    residuals, sigmas = raw_energy_errors(model, graphs(data, "val", model))
    expected = math.sqrt(math.pi / 2) * float(torch.mean(residuals.abs() / sigmas))
    assert alpha == pytest.approx(expected, rel=1e-10)
    assert settings["multiplier"] == pytest.approx(alpha)
    model.state.multiplier.fill_(alpha)
    # the force factor β on the validation forces, with the sampled members
    beta = model.state.force_scale.item()
    model.state.force_scale.fill_(1.0)
    residuals, sigmas = raw_force_errors(model, graphs(data, "val", model))
    expected = math.sqrt(math.pi / 2) * float(torch.mean(residuals.abs() / sigmas))
    assert beta == pytest.approx(expected, rel=1e-10) and beta != 1.0
    assert settings["force_scale"] == pytest.approx(beta)
    assert settings["forces_multiplier"] == pytest.approx(alpha * beta)
    # the covariance is the training set's, the base model untouched
    base = load_model(data / "base.safetensors")
    for name, tensor in base.state_dict().items():
        torch.testing.assert_close(model.potential.state_dict()[name], tensor)
    stored = model.state.covariance.clone()
    torch.testing.assert_close(
        fit_covariance(model, graphs(data, "train", model)), stored
    )
    # the calculator exposes the uncertainties; test metrics include calibration
    atoms = ase.io.read(data / "test.xyz", 0)
    atoms.calc = PESCalculator(tmp_path / "model.safetensors")
    sigma = atoms.calc.get_property("energy_uncertainty", atoms)
    assert sigma > 0 and math.isfinite(sigma)
    assert "energy_mean_squared_z" in result.test_metrics


def test_unknown_and_missing_llpr_settings_are_errors(data, tmp_path):
    config = llpr_config(data)
    del config["architecture"]["training"]["model_checkpoint"]
    with pytest.raises(TrainingConfigError, match="model_checkpoint"):
        train(config, tmp_path, progress=False)
    with pytest.raises(TrainingConfigError, match="unknown training keys"):
        train(llpr_config(data, num_epoch=3), tmp_path, progress=False)
    config = llpr_config(data)
    config["architecture"]["model"]["num_ensemble_members"] = {"forces": 4}
    with pytest.raises(TrainingConfigError, match="energy"):
        train(config, tmp_path, progress=False)
    with pytest.raises(TrainingConfigError, match="≥ 2"):
        train(llpr_config(data, members=0, num_epochs=2), tmp_path, progress=False)
    with pytest.raises(TrainingConfigError, match="calibration_method|unknown"):
        train(llpr_config(data, calibration_method="mad"), tmp_path, progress=False)
    with pytest.raises(
        TrainingConfigError, match="unknown energy_uncertainty 'both'; choose from"
    ):
        train(llpr_config(data, energy_uncertainty="both"), tmp_path, progress=False)
    with pytest.raises(TrainingConfigError, match="ensemble needs ensemble training"):
        train(
            llpr_config(data, energy_uncertainty="ensemble"), tmp_path, progress=False
        )
    config = llpr_config(data)
    config["architecture"]["training"]["model_checkpoint"] = str(data / "train.xyz")
    with pytest.raises(TrainingConfigError, match="model_checkpoint"):
        train(config, tmp_path, progress=False)


def test_ensemble_nll_training_moves_only_the_ensemble_and_lowers_the_loss(
    data, tmp_path
):
    result = train(
        llpr_config(data, members=6, num_epochs=6, learning_rate=0.05),
        tmp_path,
        progress=False,
    )
    rows = (tmp_path / "train.csv").read_text().splitlines()
    header = rows[0].split(",")
    losses = [float(r.split(",")[header.index("val_loss")]) for r in rows[1:]]
    assert losses[-1] < losses[0]
    model = load_model(result.model_path)
    base = load_model(data / "base.safetensors")
    for name, tensor in base.state_dict().items():
        torch.testing.assert_close(model.potential.state_dict()[name], tensor)
    # the trained members are no longer the sampled ones, and stay centred
    energies = model(graphs(data, "test", model)[0])
    ensemble = energies[keys.ENERGY_ENSEMBLE]
    assert ensemble.mean(dim=-1).item() == pytest.approx(
        energies[keys.ENERGY].item(), abs=1e-10
    )


def test_linearised_ensemble_equals_the_model(data):
    model = load_model(data / "base.safetensors")
    val = graphs(data, "val", model)
    llpr = wrap(model, 5, graphs(data, "train", model), val, seed=2)
    cached = linearise(llpr, val, compute_stress=True)
    linear = LinearisedEnsemble(llpr)
    for graph, cached_graph in zip(val, cached, strict=True):
        exact = llpr(graph)
        approx = linear(cached_graph)
        for key in (
            keys.ENERGY,
            keys.FORCES,
            keys.STRESS,
            keys.ENERGY_ENSEMBLE,
            keys.FORCES_ENSEMBLE,
        ):
            torch.testing.assert_close(
                approx[key], exact[key].detach(), rtol=1e-9, atol=1e-12
            )


def test_train_all_parameters_refits_the_uncertainty(data, tmp_path):
    result = train(
        llpr_config(data, num_epochs=2, train_all_parameters=True, learning_rate=0.01),
        tmp_path,
        progress=False,
    )
    model = load_model(result.model_path)
    base = load_model(data / "base.safetensors")
    weights = model.potential.architecture.last_layer.weight
    assert not torch.allclose(weights, base.architecture.last_layer.weight)
    stored = model.state.covariance.clone()
    torch.testing.assert_close(
        fit_covariance(model, graphs(data, "train", model)), stored
    )


def test_ensemble_training_refits_the_force_factor_on_the_trained_members(
    data, tmp_path
):
    result = train(
        llpr_config(
            data, num_epochs=2, learning_rate=0.05, loss={"type": "ensemble_nll"}
        ),
        tmp_path,
        progress=False,
    )
    model = load_model(result.model_path)
    beta = model.state.force_scale.item()
    model.state.force_scale.fill_(1.0)
    residuals, sigmas = raw_force_errors(model, graphs(data, "val", model))
    expected = math.sqrt(math.pi / 2) * float(torch.mean(residuals.abs() / sigmas))
    assert beta == pytest.approx(expected, rel=1e-10)
    settings = read_metadata(result.model_path)["llpr"]
    assert settings["force_scale"] == pytest.approx(beta)


def test_ensemble_nll_matches_the_gaussian_formula():
    from pes_calc.graph import AtomicGraph

    forces = torch.tensor([[0.1, 0.0, -0.2], [0.3, 0.1, 0.0]], dtype=torch.float64)
    members = forces + torch.tensor([[[0.1]], [[-0.1]]], dtype=torch.float64).expand(
        2, 2, 3
    )
    target = forces + 0.05
    graph = AtomicGraph(
        positions=torch.zeros(2, 3, dtype=torch.float64),
        cell=torch.zeros(1, 3, 3, dtype=torch.float64),
        pbc=torch.zeros(1, 3, dtype=torch.bool),
        species=torch.zeros(2, dtype=torch.long),
        edge_index=torch.zeros(2, 0, dtype=torch.long),
        edge_cell_shifts=torch.zeros(0, 3, dtype=torch.float64),
        structure_index=torch.zeros(2, dtype=torch.long),
        properties={keys.FORCES: target},
    )
    loss = EnsembleNLLLoss(keys.FORCES)
    value = loss(None, graph, {keys.FORCES: forces, keys.FORCES_ENSEMBLE: members})
    variance = 0.01 + EnsembleNLLLoss.VARIANCE_FLOOR
    expected = 0.5 * (math.log(2 * math.pi * variance) + 0.05**2 / variance)
    assert value.item() == pytest.approx(expected, rel=1e-12)
    total = ensemble_loss_from_config("ensemble_nll", ["energy", "forces"])
    assert sorted(t.name for t in total.losses) == ["energy_per_atom_nll", "forces_nll"]
    with pytest.raises(ValueError, match="stress"):
        ensemble_loss_from_config({"type": "ensemble_nll", "stress": 1.0}, ["energy"])


def test_calibration_factor_is_used_by_the_trainer_methods(data, tmp_path):
    train(
        llpr_config(data, calibration_method="squared_residuals"),
        tmp_path,
        progress=False,
    )
    model = load_model(tmp_path / "model.safetensors")
    alpha = model.state.multiplier.item()
    model.state.multiplier.fill_(1.0)
    residuals, sigmas = raw_energy_errors(model, graphs(data, "val", model))
    assert alpha == pytest.approx(
        calibration_factor(residuals, sigmas, "squared_residuals")
    )
    assert alpha == pytest.approx(
        float(np.sqrt(np.mean((residuals / sigmas).numpy() ** 2)))
    )


@pytest.mark.parametrize(
    "training",
    [
        {"energy_uncertainty": "analytic", "num_epochs": 2},
        {"energy_uncertainty": "ensemble", "num_epochs": 2},
        {},  # calibration only: analytic, no choice recorded (as older files)
    ],
    ids=["analytic", "ensemble", "calibration-only"],
)
def test_energy_uncertainty_setting_is_applied_and_shown_by_info(
    data, tmp_path, training
):
    result = train(
        llpr_config(data, learning_rate=0.05, **training), tmp_path, progress=False
    )
    model = load_model(result.model_path)
    settings = read_metadata(result.model_path)["llpr"]
    alpha = model.state.multiplier.item()
    weight = model.state.analytic_energy_weight.item()
    scale = model.state.ensemble_energy_multiplier.item()
    source = training.get("energy_uncertainty")
    assert settings.get("energy_uncertainty") == source
    # a forced source is calibrated alone: no NLL comparison recorded
    assert "energy_validation_nll" not in settings
    if source == "ensemble":
        assert weight == 0.0 and scale > 0.0
        assert settings["energy_ensemble_multiplier"] == pytest.approx(scale)
    else:  # the analytic σ alone, even after the ensemble trained: a = 0
        assert (weight, scale) == (1.0, 0.0)
        assert settings.get("energy_ensemble_multiplier", 0.0) == 0.0
        assert settings["multiplier"] == pytest.approx(alpha)
        # σ_E is α ‖L⁻¹ g_s‖ exactly, with α refitted on val
        val = graphs(data, "val", model)
        residuals, raw = raw_energy_errors(model, val)
        expected = math.sqrt(math.pi / 2) * float(torch.mean(residuals.abs() / raw))
        assert alpha == pytest.approx(expected, rel=1e-10)
        sigma = torch.cat(
            [model(graph, False, False)[keys.ENERGY_UNCERTAINTY] for graph in val]
        )
        torch.testing.assert_close(sigma.detach(), alpha * raw, rtol=1e-12, atol=0)

    # pes-calc info prints the source, α, w, a and the force factor it stored
    output = CliRunner().invoke(main, ["info", str(result.model_path)])
    assert output.exit_code == 0, output.output
    described = (
        "ensemble (a × the members' spread)"
        if source == "ensemble"
        else "analytic (α ‖L⁻¹g‖)"
    )
    for expected in (
        "LLPR           4 ensemble members, calibration absolute_residuals",
        f"energy σ       {described}: α = {alpha:.4g}, w = {weight:.4g}, "
        f"a = {scale:.4g}",
        f"forces σ       α = {settings['forces_multiplier']:.4g} "
        f"(β = {settings['force_scale']:.4g})",
    ):
        assert expected in output.output, (expected, output.output)
    assert "energies α" not in output.output
    assert "energy σ NLL" not in output.output
    # --json holds the same figures
    shown = CliRunner().invoke(main, ["info", "--json", str(result.model_path)])
    stored = json.loads(shown.output)["llpr"]
    assert stored["multiplier"] == pytest.approx(alpha)
    assert stored.get("energy_uncertainty", "analytic") == (source or "analytic")
    assert stored.get("energy_ensemble_multiplier", 0.0) == pytest.approx(scale)
