import math

import pytest
import torch

from pes_calc.graph import AtomicGraph
from pes_calc.train.stats import (
    composition_energies,
    resolve_stats,
    training_data_stats,
)

NAN = float("nan")


def graph(species, energy, forces, num_edges, stress=None) -> AtomicGraph:
    """A one-structure graph with labels; edges only counted, so all self-loops."""
    n = len(species)
    properties = {
        "energy": torch.tensor([energy], dtype=torch.float64),
        "forces": torch.tensor(forces, dtype=torch.float64),
    }
    return AtomicGraph(
        positions=torch.zeros(n, 3, dtype=torch.float64),
        cell=torch.eye(3, dtype=torch.float64)[None] * 5,
        pbc=torch.ones(1, 3, dtype=torch.bool),
        species=torch.tensor(species),
        edge_index=torch.zeros(2, num_edges, dtype=torch.int64),
        edge_cell_shifts=torch.zeros(num_edges, 3, dtype=torch.float64),
        structure_index=torch.zeros(n, dtype=torch.int64),
        properties=properties,
    )


@pytest.fixture
def graphs():
    return [
        graph([0, 1], -6.0, [[1.0, 0, 0], [0, 2.0, 0]], num_edges=4),
        graph(
            [0, 0, 1], -12.0, [[0, 0, 3.0], [NAN, NAN, NAN], [0, 0, -1.0]], num_edges=8
        ),
    ]


def test_statistics_match_hand_computed_values(graphs):
    stats = training_data_stats(graphs, ["H", "O"])
    assert stats["num_neighbors_mean"] == pytest.approx(12 / 5)
    # per-atom energies -3 and -4
    assert stats["per_atom_energy_mean"] == pytest.approx(-3.5)
    assert stats["per_atom_energy_std"] == pytest.approx(0.5)
    assert stats["total_energy_std"] == pytest.approx(3.0)
    # force components, the NaN atom left out: squares 1, 4, 9, 1 over 12 components
    assert stats["forces_rms"] == pytest.approx(math.sqrt(15 / 12))
    # type 0: 1 and 9 over 6 components; type 1: 4 and 1 over 6
    assert stats["per_type_forces_rms"] == pytest.approx(
        [math.sqrt(10 / 6), math.sqrt(5 / 6)]
    )


def test_statistics_leave_out_what_the_labels_cannot_give(graphs):
    energy_only = [
        g._replace(properties={"energy": g.properties["energy"]}) for g in graphs
    ]
    stats = training_data_stats(energy_only, ["H", "O"])
    assert "forces_rms" not in stats and "per_type_forces_rms" not in stats
    assert stats["per_atom_energy_mean"] == pytest.approx(-3.5)


def test_composition_fit_recovers_per_type_energies():
    mu = [-1.5, -4.0]
    counts = [[1, 1], [2, 1], [3, 0], [1, 3]]
    graphs = [
        graph([0] * a + [1] * b, a * mu[0] + b * mu[1], [[0, 0, 0]] * (a + b), 0)
        for a, b in counts
    ]
    assert composition_energies(graphs, 2) == pytest.approx(mu)
    # holding type 1 at a given value fits type 0 alone
    held = composition_energies(graphs, 2, fixed={1: -3.0})
    assert held[1] == -3.0
    # least squares for type 0 with residuals E - n1·(-3): solved by hand
    n0 = torch.tensor([1.0, 2, 3, 1])
    residual = torch.tensor([a * mu[0] + b * mu[1] + 3.0 * b for a, b in counts])
    assert held[0] == pytest.approx(float((n0 * residual).sum() / (n0 * n0).sum()))


def test_resolve_replaces_references_anywhere():
    stats = {"num_neighbors_mean": 12.5, "per_type_forces_rms": [0.5, 0.7]}
    config = {
        "avg_num_neighbors": "${training_data_stats:num_neighbors_mean}",
        "nested": {"scales": "${training_data_stats:per_type_forces_rms}"},
        "list": ["${training_data_stats:num_neighbors_mean}", 3],
        "plain": "silu",
    }
    assert resolve_stats(config, stats) == {
        "avg_num_neighbors": 12.5,
        "nested": {"scales": [0.5, 0.7]},
        "list": [12.5, 3],
        "plain": "silu",
    }


def test_resolve_names_the_problem():
    with pytest.raises(ValueError, match="unknown statistic 'forces_rsm'"):
        resolve_stats({"x": "${training_data_stats:forces_rsm}"}, {})
    with pytest.raises(ValueError, match="forces_rms is not available"):
        resolve_stats(
            {"x": "${training_data_stats:forces_rms}"}, {"num_neighbors_mean": 1}
        )
    with pytest.raises(ValueError, match="cannot read"):
        resolve_stats({"x": "${stats:forces_rms}"}, {})
