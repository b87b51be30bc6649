"""The energy σ of `LLPR` from either source (``llpr.energy_uncertainty``): the
analytic α ‖L⁻¹ g‖ or a times the ensemble's spread, combined as
σ² = (w α ‖L⁻¹ g‖)² + a² mean_k (g · Δw_k)²; its calibration and choice by the
validation NLL on synthetic errors of known size; old files; TorchScript,
AOTInductor and safetensors; ``pes-calc info``.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_llpr import (
    ARCHITECTURES,
    MEMBERS,
    fitted,
    graph_of,
    run,
    structure,
    three_structures,
    training_set,
    with_members,
)

from pes_calc import keys, load_model, save_model
from pes_calc.artefacts import load_artefact
from pes_calc.cli import main
from pes_calc.compile import compile_model
from pes_calc.graph import AtomicGraph, batch_graphs, sum_per_structure
from pes_calc.llpr import LLPR
from pes_calc.train.llpr import (
    ENERGY_UNCERTAINTIES,
    calibrate,
    calibrate_energy_ensemble,
    raw_energy_errors,
    recalibrate_forces,
    select_energy_uncertainty,
)


def reshaped_ensemble(name: str, seed: int = 3) -> LLPR:
    """A fitted LLPR whose members are not LLPR-shaped (random displacements,
    about the analytic σ's size), as trained members are not: their spread ranks
    structures differently from the analytic σ."""
    llpr = copy.deepcopy(fitted(name))
    generator = torch.Generator().manual_seed(seed)
    shape = llpr.state.ensemble_displacements.shape
    random = torch.randn(shape, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        llpr.state.ensemble_displacements.copy_(random)
    # scaled to the analytic σ's RMS over a few structures
    graph = batch_graphs([graph_of(atoms, llpr) for atoms in three_structures()])
    llpr.state.ensemble_energy_multiplier.fill_(1.0)
    llpr.state.analytic_energy_weight.fill_(0.0)
    spread = llpr(graph, False, False)[keys.ENERGY_UNCERTAINTY].detach()
    llpr.state.ensemble_energy_multiplier.fill_(0.0)
    llpr.state.analytic_energy_weight.fill_(1.0)
    analytic = llpr(graph, False, False)[keys.ENERGY_UNCERTAINTY].detach()
    ratio = float(analytic.square().mean().sqrt() / spread.square().mean().sqrt())
    with torch.no_grad():
        llpr.state.ensemble_displacements.mul_(ratio)
    return llpr


def features_of(llpr: LLPR, outputs: dict, species: np.ndarray, index: np.ndarray):
    """(per-atom, per-structure) g = σ_t f from the outputs' last-layer features."""
    scales = llpr.potential.per_type_energy_scales.detach().numpy()
    g_atoms = outputs[keys.LAST_LAYER_FEATURES] * scales[species][:, None]
    g_structures = np.zeros((index.max() + 1, g_atoms.shape[1]))
    np.add.at(g_structures, index, g_atoms)
    return g_atoms, g_structures


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_energy_sigma_is_the_quadrature_of_both_sources(name):
    llpr = reshaped_ensemble(name)
    weight, scale = 0.5, 2.0
    llpr.state.analytic_energy_weight.fill_(weight)
    llpr.state.ensemble_energy_multiplier.fill_(scale)
    graph = batch_graphs([graph_of(atoms, llpr) for atoms in three_structures()])
    outputs = run(llpr, graph, derivatives=False)
    species = graph.species.numpy()
    index = graph.structure_index.numpy()
    # the analytic part as the default (w, a) = (1, 0) gives it (its formula is
    # test_llpr's test_uncertainties_are_the_formula_standard_deviations)
    analytic_outputs = run(reshaped_ensemble(name), graph, derivatives=False)
    structure_analytic = analytic_outputs[keys.ENERGY_UNCERTAINTY]
    atom_analytic = analytic_outputs[keys.ENERGIES_UNCERTAINTY]
    g_atoms, g_structures = features_of(llpr, outputs, species, index)
    displacements = llpr.state.ensemble_displacements.numpy()
    displacements = displacements - displacements.mean(axis=1, keepdims=True)

    def spread(g):
        return np.sqrt(np.mean((g @ displacements) ** 2, axis=1))

    # the structure spread is the std of the ensemble's energies
    np.testing.assert_allclose(
        spread(g_structures), outputs[keys.ENERGY_ENSEMBLE].std(axis=1), rtol=1e-9
    )
    for key, analytic, g in (
        (keys.ENERGY_UNCERTAINTY, structure_analytic, g_structures),
        (keys.ENERGIES_UNCERTAINTY, atom_analytic, g_atoms),
    ):
        expected = np.sqrt((weight * analytic) ** 2 + (scale * spread(g)) ** 2)
        np.testing.assert_allclose(outputs[key], expected, rtol=1e-10, err_msg=key)
    # only the energy σ: forces and their σ do not depend on (w, a)
    before = run(fitted(name), graph)
    llpr_forces = run(reshaped_ensemble(name), graph)
    changed = run(llpr, graph)
    for key in (keys.ENERGY, keys.FORCES, keys.FORCES_UNCERTAINTY):
        np.testing.assert_array_equal(changed[key], llpr_forces[key], err_msg=key)
    np.testing.assert_array_equal(changed[keys.FORCES], before[keys.FORCES])


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_files_without_the_energy_sigma_weights_load_as_before(name, tmp_path):
    """A file written before the choice (no weight tensors, no digests) loads
    with (w, a) = (1, 0), and its σ_E is α ‖L⁻¹ g‖ bit for bit, as the old code
    computed it."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    llpr = reshaped_ensemble(name)
    llpr.state.analytic_energy_weight.fill_(0.0)  # what an old file cannot hold
    llpr.state.ensemble_energy_multiplier.fill_(3.0)
    save_model(llpr, tmp_path / "new.safetensors")
    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as handle:
        header = dict(handle.metadata())
    del header["digests"]
    tensors = load_file(str(tmp_path / "new.safetensors"))
    del tensors["state.analytic_energy_weight"]
    del tensors["state.ensemble_energy_multiplier"]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=header)
    with pytest.warns(UserWarning, match="cannot be checked"):
        old = load_model(tmp_path / "old.safetensors")
    assert float(old.state.analytic_energy_weight) == 1.0
    assert float(old.state.ensemble_energy_multiplier) == 0.0
    graph = batch_graphs([graph_of(atoms, llpr) for atoms in three_structures()])
    outputs = old(graph, True, True)
    # the old formula, as the old forward computed it
    with torch.no_grad():
        predicted, _, _ = old.potential.predict_energies(graph, False, False)
        g = old.llpr_features(predicted[keys.LAST_LAYER_FEATURES], graph.species)
        g_structures = sum_per_structure(g, graph)
        inverse = old.state.inverse_cholesky
        alpha = old.state.multiplier
        expected_atoms = alpha * torch.linalg.vector_norm(
            g.double() @ inverse.T, dim=-1
        )
        expected = alpha * torch.linalg.vector_norm(
            g_structures.double() @ inverse.T, dim=-1
        )
    assert torch.equal(outputs[keys.ENERGIES_UNCERTAINTY].detach(), expected_atoms)
    assert torch.equal(outputs[keys.ENERGY_UNCERTAINTY].detach(), expected)
    # everything else is the new file's
    new = run(llpr, graph)
    for key in (keys.ENERGY, keys.FORCES, keys.ENERGY_ENSEMBLE, keys.FORCES_ENSEMBLE):
        np.testing.assert_array_equal(outputs[key].detach().numpy(), new[key])


def synthetic_graphs(llpr: LLPR, source: str, factor: float, count: int, seed: int):
    """``count`` structures labelled E_ref = E - factor σ_raw z, z ~ N(0, 1), with
    σ_raw the uncalibrated σ of ``source``: errors of known size and shape."""
    graphs = [graph_of(atoms, llpr) for atoms in training_set(count, seed=seed)]
    dummy = [
        g._replace(properties={keys.ENERGY: torch.zeros(1, dtype=torch.float64)})
        for g in graphs
    ]
    # residuals against a zero label are the predictions themselves
    energies, sigmas = raw_energy_errors(llpr, dummy, batch_size=50, source=source)
    z = torch.from_numpy(np.random.default_rng(seed).standard_normal(count))
    targets = energies - factor * sigmas * z
    return [
        g._replace(properties={keys.ENERGY: targets[i : i + 1].clone()})
        for i, g in enumerate(graphs)
    ]


@pytest.mark.parametrize(
    ("truth", "factor"), [("ensemble", 0.7), ("analytic", 0.02)], ids=str
)
def test_the_validation_nll_finds_the_source_of_synthetic_errors(truth, factor):
    """300 structures whose errors are N(0, (c σ_raw)²) for one source: "auto"
    picks that source, recovers c (squared residuals: within 3 standard errors,
    1/√(2n) = 4 %), and the runtime σ then meet mean z² = 1 on those structures."""
    llpr = reshaped_ensemble("soap_bpnn")
    graphs = synthetic_graphs(llpr, truth, factor, 300, seed=11)
    chosen = select_energy_uncertainty(llpr, graphs, "squared_residuals", batch_size=50)
    assert chosen == truth
    settings = llpr.config["llpr"]
    assert settings["energy_uncertainty"] == truth
    scores = settings["energy_validation_nll"]
    assert set(scores) == set(ENERGY_UNCERTAINTIES)
    assert scores[truth] < min(scores.values()) + 1e-12
    other = next(s for s in ENERGY_UNCERTAINTIES if s != truth)
    assert scores[other] > scores[truth] + 0.05  # nats: a clear preference
    if truth == "ensemble":
        fitted_factor = float(llpr.state.ensemble_energy_multiplier)
        assert float(llpr.state.analytic_energy_weight) == 0.0
        assert settings["energy_ensemble_multiplier"] == fitted_factor
    else:
        fitted_factor = float(llpr.state.multiplier)
        assert float(llpr.state.analytic_energy_weight) == 1.0
        assert float(llpr.state.ensemble_energy_multiplier) == 0.0
        assert settings["multiplier"] == fitted_factor
    assert fitted_factor == pytest.approx(factor, rel=3 / math.sqrt(600))
    z = []
    for graph in graphs:
        outputs = run(llpr, graph, derivatives=False)
        error = outputs[keys.ENERGY] - graph.properties[keys.ENERGY].numpy()
        z.append(float(error[0] / outputs[keys.ENERGY_UNCERTAINTY][0]))
    assert np.mean(np.square(z)) == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("method", ["absolute_residuals", "squared_residuals"])
def test_ensemble_calibration_meets_the_methods_condition(method):
    llpr = reshaped_ensemble("nequip")
    graphs = synthetic_graphs(llpr, "ensemble", 1.3, 40, seed=12)
    scale = calibrate_energy_ensemble(llpr, graphs, method, batch_size=7)
    assert float(llpr.state.ensemble_energy_multiplier) == scale > 0
    z = []
    for graph in graphs:
        outputs = run(llpr, graph, derivatives=False)
        error = outputs[keys.ENERGY] - graph.properties[keys.ENERGY].numpy()
        z.append(float(error[0] / outputs[keys.ENERGY_UNCERTAINTY][0]))
    z = np.array(z)
    if method == "squared_residuals":
        assert np.mean(z**2) == pytest.approx(1.0, rel=1e-9)
    else:
        assert math.sqrt(math.pi / 2) * np.mean(np.abs(z)) == pytest.approx(
            1.0, rel=1e-9
        )
    # the analytic calibration puts the analytic σ back: (w, a) = (1, 0)
    alpha = calibrate(llpr, graphs, method, batch_size=7)
    assert float(llpr.state.multiplier) == alpha
    assert float(llpr.state.analytic_energy_weight) == 1.0
    assert float(llpr.state.ensemble_energy_multiplier) == 0.0


def test_a_named_source_is_used_and_bad_choices_are_errors():
    llpr = reshaped_ensemble("soap_bpnn")
    graphs = synthetic_graphs(llpr, "ensemble", 0.7, 30, seed=13)
    assert select_energy_uncertainty(llpr, graphs, source="analytic") == "analytic"
    assert "energy_validation_nll" not in llpr.config["llpr"]
    assert float(llpr.state.ensemble_energy_multiplier) == 0.0
    assert select_energy_uncertainty(llpr, graphs, source="ensemble") == "ensemble"
    with pytest.raises(ValueError, match="unknown energy_uncertainty 'spread'"):
        select_energy_uncertainty(llpr, graphs, source="spread")
    without_members = with_members(fitted("soap_bpnn"), 0)
    assert select_energy_uncertainty(without_members, graphs) == "analytic"
    with pytest.raises(ValueError, match="needs ensemble members"):
        select_energy_uncertainty(without_members, graphs, source="ensemble")


def test_the_trainers_recalibration_chooses_the_energy_sigma_and_wrap_does_not():
    """`recalibrate_forces` (what the trainer calls after ensemble training)
    refits β and picks the energy σ; `wrap` (sampled members) keeps the analytic
    σ and records no choice."""
    wrapped = fitted("soap_bpnn")
    assert float(wrapped.state.analytic_energy_weight) == 1.0
    assert float(wrapped.state.ensemble_energy_multiplier) == 0.0
    assert "energy_uncertainty" not in wrapped.config["llpr"]
    llpr = reshaped_ensemble("soap_bpnn")
    graphs = synthetic_graphs(llpr, "ensemble", 0.7, 60, seed=14)
    recalibrate_forces(llpr, graphs, "absolute_residuals", batch_size=20)
    settings = llpr.config["llpr"]
    assert settings["energy_uncertainty"] == "ensemble"
    assert "force_scale" not in settings  # energy labels only: β stays 1
    recalibrate_forces(llpr, graphs, "absolute_residuals", energies=None)
    assert settings["energy_uncertainty"] == "ensemble"  # untouched


def ensemble_sigma_model() -> LLPR:
    llpr = reshaped_ensemble("soap_bpnn")
    llpr.state.analytic_energy_weight.fill_(0.25)
    llpr.state.ensemble_energy_multiplier.fill_(1.5)
    llpr.config["llpr"]["energy_uncertainty"] = "ensemble"
    llpr.config["llpr"]["energy_ensemble_multiplier"] = 1.5
    return llpr


def energy_graphs(llpr: LLPR) -> AtomicGraph:
    atoms = [*three_structures(), structure("primitive", 3)]
    return batch_graphs([graph_of(a, llpr) for a in atoms])


def test_safetensors_and_torchscript_keep_the_energy_sigma(tmp_path):
    llpr = ensemble_sigma_model()
    graph = energy_graphs(llpr)
    expected = run(llpr, graph)
    save_model(llpr, tmp_path / "model.safetensors")
    loaded = load_model(tmp_path / "model.safetensors")
    assert loaded.config["llpr"]["energy_uncertainty"] == "ensemble"
    compile_model(llpr, tmp_path / "model.pt")
    artefact, metadata = load_artefact(tmp_path / "model.pt")
    assert metadata["llpr"]["energy_ensemble_multiplier"] == 1.5
    for model in (loaded, artefact):
        got = run(model, graph)
        for key in (keys.ENERGY_UNCERTAINTY, keys.ENERGIES_UNCERTAINTY):
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-10)


def test_aotinductor_keeps_the_energy_sigma(tmp_path, monkeypatch):
    """The weights are buffers of the compiled graph: an AOTInductor package
    (about a minute to compile) gives the eager σ_E."""
    monkeypatch.setenv("PES_CALC_CACHE_DIR", str(tmp_path / "cache"))
    llpr = ensemble_sigma_model()
    path = tmp_path / "model.pt2"
    compile_model(llpr, path, mode="aotinductor")
    package, metadata = load_artefact(path)
    assert metadata["llpr"]["energy_uncertainty"] == "ensemble"
    graph = energy_graphs(llpr)
    expected = run(llpr, graph)
    got = run(package, graph)
    for key in (keys.ENERGY_UNCERTAINTY, keys.ENERGIES_UNCERTAINTY):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-9, err_msg=key)
    analytic = run(fitted("soap_bpnn"), graph)[keys.ENERGY_UNCERTAINTY]
    assert not np.allclose(got[keys.ENERGY_UNCERTAINTY], analytic)


def test_info_shows_the_energy_sigma(tmp_path):
    llpr = ensemble_sigma_model()
    save_model(llpr, tmp_path / "model.safetensors")
    result = CliRunner().invoke(
        main, ["info", "--json", str(tmp_path / "model.safetensors")]
    )
    assert result.exit_code == 0, result.output
    settings = json.loads(result.output)["llpr"]
    assert settings["energy_uncertainty"] == "ensemble"
    assert settings["energy_ensemble_multiplier"] == 1.5
    assert settings["num_ensemble_members"] == {"energy": MEMBERS}
