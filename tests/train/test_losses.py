import math

import pytest
import torch

from pes_calc.graph import AtomicGraph
from pes_calc.train.losses import (
    MAE,
    MSE,
    RMSE,
    PerAtomEnergyLoss,
    PropertyLoss,
    TotalLoss,
    loss_from_config,
)

NAN = float("nan")


def two_structures() -> AtomicGraph:
    """Structures of 1 and 3 atoms, with energy, forces and (one NaN) stress labels."""
    return AtomicGraph(
        positions=torch.zeros(4, 3),
        cell=torch.zeros(2, 3, 3),
        pbc=torch.zeros(2, 3, dtype=torch.bool),
        species=torch.zeros(4, dtype=torch.int64),
        edge_index=torch.zeros(2, 0, dtype=torch.int64),
        edge_cell_shifts=torch.zeros(0, 3),
        structure_index=torch.tensor([0, 1, 1, 1]),
        properties={
            "energy": torch.tensor([-1.0, -9.0]),
            "forces": torch.tensor(
                [[1.0, 0, 0], [0, 0, 0], [0, 0, 0], [NAN, NAN, NAN]]
            ),
            "stress": torch.stack([torch.full((3, 3), NAN), torch.eye(3)]),
        },
    )


def test_metrics_on_known_errors():
    prediction = torch.tensor([1.0, 2.0, 3.0, 4.0])
    target = torch.tensor([1.0, 0.0, 3.0, NAN])  # errors 0, 2, 0; the NaN is skipped
    assert MSE()(prediction, target).item() == pytest.approx(4 / 3)
    assert RMSE()(prediction, target).item() == pytest.approx(math.sqrt(4 / 3))
    assert MAE()(prediction, target).item() == pytest.approx(2 / 3)


def test_metric_without_labels_is_zero_with_a_gradient():
    prediction = torch.ones(3, requires_grad=True)
    value = MSE()(prediction, torch.full((3,), NAN))
    value.backward()
    assert value.item() == 0.0 and prediction.grad.tolist() == [0.0, 0.0, 0.0]


def test_losses_read_labels_from_the_graph():
    graph = two_structures()
    predictions = {
        "energy": torch.tensor([-2.0, -6.0]),
        "forces": torch.zeros(4, 3),
        "stress": torch.zeros(2, 3, 3),
    }
    # per atom: errors -1/1 and 3/3 → MAE 1; total: errors -1 and 3 → MAE 2
    assert PerAtomEnergyLoss("MAE")(None, graph, predictions).item() == pytest.approx(
        1.0
    )
    assert PropertyLoss("energy", "MAE")(
        None, graph, predictions
    ).item() == pytest.approx(2.0)
    # forces: one non-zero component of 9 labelled ones
    assert PropertyLoss("forces", "MSE")(
        None, graph, predictions
    ).item() == pytest.approx(1 / 9)
    # stress: only the second structure: three ones among nine entries
    assert PropertyLoss("stress", "MSE")(
        None, graph, predictions
    ).item() == pytest.approx(3 / 9)


def test_total_loss_weights_terms_and_names_them():
    graph = two_structures()
    predictions = {"energy": torch.tensor([-2.0, -6.0]), "forces": torch.zeros(4, 3)}
    total_loss = TotalLoss(
        [
            PerAtomEnergyLoss("MAE", weight=2.0),
            PropertyLoss("forces", "MSE", weight=9.0),
        ]
    )
    total, terms = total_loss(None, graph, predictions)
    assert set(terms) == {"energy_per_atom_mae", "forces_mse"}
    assert total.item() == pytest.approx(2.0 * 1.0 + 9.0 * (1 / 9))
    assert total_loss.required_properties == ["energy", "forces"]


def test_loss_from_config():
    loss = loss_from_config(
        {"metric": "RMSE", "energy": 1.0, "forces": {"weight": 10}},
        ["energy", "forces", "stress"],
    )
    assert [
        (type(t).__name__, t.weight, type(t.metric).__name__) for t in loss.losses
    ] == [("PerAtomEnergyLoss", 1.0, "RMSE"), ("PropertyLoss", 10.0, "RMSE")]
    default = loss_from_config(None, ["energy", "forces"])
    assert [t.name for t in default.losses] == ["energy_per_atom_mse", "forces_mse"]
    with pytest.raises(ValueError, match="unknown loss term 'force'"):
        loss_from_config({"force": 1.0}, ["energy", "forces"])
    with pytest.raises(ValueError, match="needs stress labels"):
        loss_from_config({"stress": 1.0}, ["energy", "forces"])
    with pytest.raises(ValueError, match="unknown metric"):
        loss_from_config({"energy": {"metric": "huber"}}, ["energy"])
