import math

import numpy as np
import pytest
import torch
from helpers import emt_structures

from pes_calc.train.data import LabelKeys, extract_labels, labelled_graphs
from pes_calc.train.evaluation import evaluate
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
        return {"energy": 2.0 * counts.double() + self.weight,
                "forces": forces,
                "stress": torch.zeros(graph.cell.shape[0], 3, 3, dtype=torch.float64)}


@pytest.fixture(scope="module")
def graphs():
    structures = emt_structures(3, seed=5)
    labels = extract_labels(structures, LabelKeys())
    return structures, labelled_graphs(structures, labels, ["Cu"], 3.0)


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_errors_over_the_whole_set_whatever_the_batches(graphs, batch_size):
    structures, graph_list = graphs
    metrics = evaluate(Constant(), graph_list, batch_size=batch_size).metrics()
    energy_errors = [2.0 - a.get_potential_energy() / len(a) for a in structures]
    force_errors = np.concatenate(
        [(np.array([1.0, 0, 0]) - a.get_forces()).ravel() for a in structures])
    # the cluster has no stress: only the three cells count
    stress_errors = np.concatenate(
        [-a.get_stress(voigt=False).ravel() for a in structures[:3]])
    assert metrics["energy_per_atom_rmse"] == pytest.approx(
        math.sqrt(np.mean(np.square(energy_errors))))
    assert metrics["energy_per_atom_mae"] == pytest.approx(np.mean(np.abs(energy_errors)))
    assert metrics["forces_rmse"] == pytest.approx(np.sqrt(np.mean(force_errors**2)), rel=1e-6)
    assert metrics["stress_mae"] == pytest.approx(np.mean(np.abs(stress_errors)), rel=1e-6)
    assert metrics["rmse_prod"] == pytest.approx(
        metrics["energy_per_atom_rmse"] * metrics["forces_rmse"] * metrics["stress_rmse"])
    assert metrics["num_structures"] == 4


def test_loss_is_averaged_over_batches(graphs):
    _, graph_list = graphs
    loss_fn = TotalLoss([PerAtomEnergyLoss("MSE"), PropertyLoss("forces", "MSE", 0.5)])
    from pes_calc.graph import batch_graphs

    whole = batch_graphs(graph_list)
    expected = loss_fn(None, whole, Constant()(whole))[0].item()
    evaluation = evaluate(Constant(), graph_list, batch_size=16, loss_fn=loss_fn)
    assert evaluation.mean_loss == pytest.approx(expected)
