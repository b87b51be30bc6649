import math

import numpy as np
import pytest
import torch
from helpers import emt_structures

from pes_calc.train.data import LabelKeys, extract_labels, labelled_graphs
from pes_calc.train.evaluation import (
    average_ranks,
    calibration_bins,
    calibration_metrics,
    measure_errors,
    spearman,
)
from pes_calc.train.losses import PerAtomEnergyLoss, PropertyLoss, TotalLoss


class Constant(torch.nn.Module):
    """Predicts energy 2 eV per atom, forces (1, 0, 0) and zero stress everywhere."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, graph, compute_forces=True, compute_stress=True):
        n = graph.positions.shape[0]
        counts = torch.bincount(graph.structure_index, minlength=graph.cell.shape[0])
        forces = torch.zeros(n, 3, dtype=torch.float64)
        forces[:, 0] = 1.0
        return {
            "energy": 2.0 * counts.double() + self.weight,
            "forces": forces,
            "stress": torch.zeros(graph.cell.shape[0], 3, 3, dtype=torch.float64),
        }


@pytest.fixture(scope="module")
def graphs():
    structures = emt_structures(3, seed=5)
    labels = extract_labels(structures, LabelKeys())
    return structures, labelled_graphs(structures, labels, ["Cu"], 3.0)


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_errors_over_the_whole_set_whatever_the_batches(graphs, batch_size):
    structures, graph_list = graphs
    metrics = measure_errors(Constant(), graph_list, batch_size=batch_size).metrics()
    energy_errors = [2.0 - a.get_potential_energy() / len(a) for a in structures]
    force_errors = np.concatenate(
        [(np.array([1.0, 0, 0]) - a.get_forces()).ravel() for a in structures]
    )
    # the cluster has no stress: only the three cells count
    stress_errors = np.concatenate(
        [-a.get_stress(voigt=False).ravel() for a in structures[:3]]
    )
    assert metrics["energy_per_atom_rmse"] == pytest.approx(
        math.sqrt(np.mean(np.square(energy_errors)))
    )
    assert metrics["energy_per_atom_mae"] == pytest.approx(
        np.mean(np.abs(energy_errors))
    )
    assert metrics["forces_rmse"] == pytest.approx(
        np.sqrt(np.mean(force_errors**2)), rel=1e-6
    )
    assert metrics["stress_mae"] == pytest.approx(
        np.mean(np.abs(stress_errors)), rel=1e-6
    )
    assert metrics["rmse_prod"] == pytest.approx(
        metrics["energy_per_atom_rmse"]
        * metrics["forces_rmse"]
        * metrics["stress_rmse"]
    )
    assert metrics["num_structures"] == 4


def test_loss_is_averaged_over_batches(graphs):
    _, graph_list = graphs
    loss_fn = TotalLoss([PerAtomEnergyLoss("MSE"), PropertyLoss("forces", "MSE", 0.5)])
    from pes_calc.graph import batch_graphs

    whole = batch_graphs(graph_list)
    expected = loss_fn(None, whole, Constant()(whole))[0].item()
    evaluation = measure_errors(Constant(), graph_list, batch_size=16, loss_fn=loss_fn)
    assert evaluation.mean_loss == pytest.approx(expected)


def test_non_uncertainty_models_report_exactly_the_error_keys(graphs):
    _, graph_list = graphs
    metrics = measure_errors(Constant(), graph_list).metrics()
    assert set(metrics) == {
        f"{q}_{kind}"
        for q in ("energy_per_atom", "forces", "stress")
        for kind in ("rmse", "mae")
    } | {"mae_prod", "num_structures", "rmse_prod"}


# ---------------------------------------------------------------- calibration


def test_average_ranks_share_ties():
    np.testing.assert_array_equal(
        average_ranks(np.array([3.0, 1.0, 4.0, 1.0, 5.0, 4.0, 4.0])),
        [3.0, 1.5, 5.0, 1.5, 7.0, 5.0, 5.0],  # the 4s hold ranks 4, 5, 6
    )


def test_spearman_of_monotone_reversed_and_textbook_data():
    x = np.array([0.1, 0.5, 0.7, 2.0, 9.0])
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)  # monotone, not linear
    assert spearman(x, -(x**3)) == pytest.approx(-1.0)
    # no ties: ρ = 1 - 6 Σd² / (n(n² - 1)); d = (-1, 1, -1, 1, 0) → 1 - 24/120
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    # ties: Pearson of ranks (1, 2, 3, 4) and (1.5, 1.5, 3, 4) = 4.5 / √(5 · 4.5)
    assert spearman([1, 2, 3, 4], [7, 7, 8, 9]) == pytest.approx(math.sqrt(0.9))
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))  # no ranking to correlate


def test_calibration_metrics_against_hand_computed_values():
    residuals = np.array([0.1, -0.2, 0.3])
    sigmas = np.array([0.1, 0.1, 0.2])
    metrics = calibration_metrics(residuals, sigmas)
    squared_z = [1.0, 4.0, 2.25]
    assert metrics["mean_squared_z"] == pytest.approx(7.25 / 3)
    assert metrics["nll"] == pytest.approx(
        (
            0.5 * (math.log(2 * math.pi * 0.01) + 1.0)
            + 0.5 * (math.log(2 * math.pi * 0.01) + 4.0)
            + 0.5 * (math.log(2 * math.pi * 0.04) + 2.25)
        )
        / 3
    )
    density = np.exp(-0.5 * np.array(squared_z)) / np.sqrt(2 * np.pi * sigmas**2)
    assert metrics["nll"] == pytest.approx(np.mean(-np.log(density)))
    # σ ranks (1.5, 1.5, 3), |r| ranks (1, 2, 3): 1.5 / √(1.5 · 2) = √3 / 2
    assert metrics["spearman"] == pytest.approx(math.sqrt(3) / 2)
    assert metrics["uncertainty_mean"] == pytest.approx(0.4 / 3)


def test_doubling_sigma_quarters_the_mean_squared_z():
    rng = np.random.default_rng(0)
    residuals, sigmas = rng.normal(size=50), rng.uniform(0.5, 2.0, size=50)
    once, twice = (
        calibration_metrics(residuals, sigmas),
        calibration_metrics(residuals, 2 * sigmas),
    )
    assert twice["mean_squared_z"] == pytest.approx(once["mean_squared_z"] / 4)
    # ½ log(4σ²) = ½ log σ² + log 2, and the z² term is quartered
    assert twice["nll"] == pytest.approx(
        once["nll"] + math.log(2) - 0.375 * once["mean_squared_z"]
    )
    assert twice["spearman"] == pytest.approx(once["spearman"])
    assert twice["uncertainty_mean"] == pytest.approx(2 * once["uncertainty_mean"])


def test_calibrated_gaussian_errors_score_one():
    rng = np.random.default_rng(1)
    sigmas = rng.uniform(0.01, 0.1, size=200_000)
    residuals = sigmas * rng.standard_normal(sigmas.size)
    metrics = calibration_metrics(residuals, sigmas)
    assert metrics["mean_squared_z"] == pytest.approx(1.0, abs=0.01)
    # the Gaussian entropy: E[NLL] = E[½ log(2π σ²)] + ½
    assert metrics["nll"] == pytest.approx(
        np.mean(0.5 * np.log(2 * np.pi * sigmas**2)) + 0.5, abs=0.005
    )
    rms_sigma, rms_error, counts = calibration_bins(residuals, sigmas)
    assert counts.sum() == sigmas.size and len(counts) == 12
    np.testing.assert_allclose(rms_error / rms_sigma, 1.0, atol=0.02)


def test_calibration_bins_hold_equal_counts_in_sigma_order():
    sigmas = np.array([6.0, 1.0, 5.0, 2.0, 4.0, 3.0])
    residuals = np.array([0.0, 1.0, 3.0, 1.0, 4.0, 0.0])
    rms_sigma, rms_error, counts = calibration_bins(residuals, sigmas, num_bins=3)
    np.testing.assert_array_equal(counts, [2, 2, 2])
    # bins σ = {1, 2}, {3, 4}, {5, 6}
    np.testing.assert_allclose(rms_sigma, np.sqrt([2.5, 12.5, 30.5]))
    np.testing.assert_allclose(rms_error, np.sqrt([1.0, 8.0, 4.5]))
    assert len(calibration_bins(residuals[:2], sigmas[:2], num_bins=12)[2]) == 2


class WithUncertainty(Constant):
    """`Constant` with σ_E = 0.5 eV per atom and σ_F = 0.1·(1 + atom index) eV/Å,
    except a zero σ (no z-score) on the first atom's x component."""

    def forward(self, graph, compute_forces=True, compute_stress=True):
        outputs = super().forward(graph, compute_forces, compute_stress)
        counts = torch.bincount(graph.structure_index, minlength=graph.cell.shape[0])
        n = graph.positions.shape[0]
        index = torch.arange(n, dtype=torch.float64)
        sigma = 0.1 * (1 + index).unsqueeze(-1).repeat(1, 3)
        sigma[0, 0] = 0.0
        outputs["energy_uncertainty"] = 0.5 * counts.double()
        outputs["forces_uncertainty"] = sigma
        return outputs


def test_uncertainties_are_scored_against_labelled_residuals(graphs):
    structures, graph_list = graphs
    # the second structure lost its energy label: no energy residual for it
    unlabelled = dict(graph_list[1].properties)
    unlabelled["energy"] = torch.full_like(unlabelled["energy"], math.nan)
    graph_list = [
        graph_list[0],
        graph_list[1]._replace(properties=unlabelled),
        *graph_list[2:],
    ]
    metrics = measure_errors(WithUncertainty(), graph_list, batch_size=1).metrics()

    kept = [a for i, a in enumerate(structures) if i != 1]
    energy_residuals = np.array([2.0 * len(a) - a.get_potential_energy() for a in kept])
    energy_sigmas = np.array([0.5 * len(a) for a in kept])
    expected = calibration_metrics(energy_residuals, energy_sigmas)
    for name, value in expected.items():
        assert metrics[f"energy_{name}"] == pytest.approx(value, rel=1e-12), name
    assert metrics["energy_mean_squared_z"] == pytest.approx(
        np.mean((energy_residuals / energy_sigmas) ** 2)
    )

    force_residuals, force_sigmas = [], []
    for atoms in structures:  # batch_size 1: the atom index restarts per structure
        residual = np.array([1.0, 0.0, 0.0]) - atoms.get_forces()
        sigma = np.repeat(0.1 * (1 + np.arange(len(atoms)))[:, None], 3, axis=1)
        force_residuals.append(residual.ravel()[1:])  # σ = 0 on x of atom 0
        force_sigmas.append(sigma.ravel()[1:])
    force_residuals, force_sigmas = (
        np.concatenate(force_residuals),
        np.concatenate(force_sigmas),
    )
    assert metrics["forces_mean_squared_z"] == pytest.approx(
        np.mean(force_residuals**2 / force_sigmas**2), rel=1e-10
    )
    assert metrics["forces_nll"] == pytest.approx(
        np.mean(
            0.5 * np.log(2 * np.pi * force_sigmas**2)
            + 0.5 * force_residuals**2 / force_sigmas**2
        ),
        rel=1e-10,
    )
    assert metrics["forces_spearman"] == pytest.approx(
        spearman(force_sigmas, np.abs(force_residuals)), rel=1e-12
    )
    # the error keys are still there, and unchanged by the uncertainties
    plain = measure_errors(Constant(), graph_list, batch_size=1).metrics()
    assert {k: metrics[k] for k in plain} == plain


def test_per_atom_force_calibration_uses_norms_over_the_components(graphs):
    """atom_forces: ‖ΔF_i‖/√3 against ‖σ_F,i‖/√3 for every atom (σ_i > 0 even
    where one component's σ is 0)."""
    structures, graph_list = graphs
    metrics = measure_errors(WithUncertainty(), graph_list, batch_size=1).metrics()
    errors, sigmas = [], []
    for atoms in structures:
        residual = np.array([1.0, 0.0, 0.0]) - atoms.get_forces()
        sigma = np.repeat(0.1 * (1 + np.arange(len(atoms)))[:, None], 3, axis=1)
        sigma[0, 0] = 0.0
        errors.append(np.linalg.norm(residual, axis=1) / np.sqrt(3))
        sigmas.append(np.linalg.norm(sigma, axis=1) / np.sqrt(3))
    errors, sigmas = np.concatenate(errors), np.concatenate(sigmas)
    assert metrics["atom_forces_mean_squared_z"] == pytest.approx(
        np.mean(errors**2 / sigmas**2), rel=1e-10
    )
    assert metrics["atom_forces_spearman"] == pytest.approx(
        spearman(sigmas, errors), rel=1e-12
    )
    assert metrics["atom_forces_uncertainty_mean"] == pytest.approx(
        np.mean(sigmas), rel=1e-12
    )
