"""Tests of `pes_calc.graph`: hand-built graphs with hand-computed answers."""

import pytest
import torch

from pes_calc.graph import (
    AtomicGraph,
    atoms_per_structure,
    batch_graphs,
    edge_vectors,
    graph_to,
    number_of_atoms,
    number_of_edges,
    number_of_structures,
    sum_per_structure,
    with_positions_and_cell,
)


def _graph(
    positions,
    cell,
    edges,
    shifts,
    *,
    pbc=(True, True, True),
    species=None,
    dtype=torch.float64,
) -> AtomicGraph:
    """One structure from plain lists."""
    n = len(positions)
    return AtomicGraph(
        positions=torch.tensor(positions, dtype=dtype),
        cell=torch.as_tensor(cell, dtype=dtype).reshape(1, 3, 3),
        pbc=torch.tensor([pbc]),
        species=torch.tensor(species if species is not None else [0] * n),
        edge_index=torch.tensor(edges, dtype=torch.int64).reshape(2, -1),
        edge_cell_shifts=torch.tensor(shifts, dtype=dtype).reshape(-1, 3),
        structure_index=torch.zeros(n, dtype=torch.int64),
        properties={},
    )


@pytest.fixture
def dimer() -> AtomicGraph:
    """Two atoms in a triclinic cell; one plain edge, one through an image."""
    return _graph(
        positions=[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]],
        cell=[[4.0, 0.0, 0.0], [1.0, 5.0, 0.0], [0.5, 0.5, 6.0]],
        # 0→1 plain; 1→0 with shift (1, -1, 0); 0→0 self-image, shift (0, 0, 1)
        edges=[[0, 1, 0], [1, 0, 0]],
        shifts=[[0, 0, 0], [1, -1, 0], [0, 0, 1]],
        species=[0, 1],
    )


def test_counts(dimer):
    assert number_of_atoms(dimer) == 2
    assert number_of_edges(dimer) == 3
    assert number_of_structures(dimer) == 1
    assert atoms_per_structure(dimer).tolist() == [2]


def test_edge_vectors_by_hand(dimer):
    vectors = edge_vectors(dimer)
    # r_ij = R_j - R_i + S @ cell
    # 0→1: (1, 2, 3)
    # 1→0: (0,0,0) - (1,2,3) + (1*(4,0,0) - 1*(1,5,0)) = (-1,-2,-3) + (3,-5,0)
    # 0→0: cell[2] = (0.5, 0.5, 6)
    expected = torch.tensor(
        [[1.0, 2.0, 3.0], [2.0, -7.0, -3.0], [0.5, 0.5, 6.0]], dtype=torch.float64
    )
    assert vectors.dtype == torch.float64
    torch.testing.assert_close(vectors, expected, rtol=0, atol=1e-14)


def test_edge_vectors_use_each_structure_own_cell():
    a = _graph([[0.0, 0.0, 0.0]], torch.eye(3) * 2.0, [[0], [0]], [[1, 0, 0]])
    b = _graph([[0.0, 0.0, 0.0]], torch.eye(3) * 3.0, [[0], [0]], [[0, 1, 0]])
    vectors = edge_vectors(batch_graphs([a, b]))
    torch.testing.assert_close(
        vectors,
        torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]], dtype=torch.float64),
    )


def test_edge_vectors_differentiable_in_positions_and_cell(dimer):
    positions = dimer.positions.clone().requires_grad_(True)
    cell = dimer.cell.clone().requires_grad_(True)
    graph = with_positions_and_cell(dimer, positions, cell)
    edge_vectors(graph)[:, 0].sum().backward()
    # x-components summed: atom 0 gains -1 (edge 0→1) +1 (edge 1→0); 0→0 cancels
    # atom 1 gains +1 (edge 0→1) -1 (edge 1→0)
    torch.testing.assert_close(positions.grad, torch.zeros(2, 3, dtype=torch.float64))
    # d/dcell[a, 0] of Σ_e S_e[a] cell[a, 0]: Σ of shifts = (1, -1, 1)
    expected = torch.zeros(1, 3, 3, dtype=torch.float64)
    expected[0, :, 0] = torch.tensor([1.0, -1.0, 1.0])
    torch.testing.assert_close(cell.grad, expected)


def test_sum_per_structure_by_hand():
    graph = batch_graphs(
        [
            _graph([[0.0] * 3] * 2, torch.eye(3), [[], []], []),
            _graph([[0.0] * 3] * 3, torch.eye(3), [[], []], []),
        ]
    )
    values = torch.tensor([1.0, 2.0, 10.0, 20.0, 30.0], dtype=torch.float64)
    torch.testing.assert_close(
        sum_per_structure(values, graph), torch.tensor([3.0, 60.0], dtype=torch.float64)
    )
    vectors = torch.arange(15, dtype=torch.float64).reshape(5, 3)
    torch.testing.assert_close(
        sum_per_structure(vectors, graph),
        torch.tensor([[3.0, 5.0, 7.0], [27.0, 30.0, 33.0]], dtype=torch.float64),
    )
    assert atoms_per_structure(graph).tolist() == [2, 3]


def test_sum_per_structure_keeps_empty_structure_and_gradient():
    # a structure with no atoms in the middle of a batch still gets a (zero) total
    graph = AtomicGraph(
        positions=torch.zeros(3, 3),
        cell=torch.zeros(3, 3, 3),
        pbc=torch.zeros(3, 3, dtype=torch.bool),
        species=torch.zeros(3, dtype=torch.int64),
        edge_index=torch.zeros(2, 0, dtype=torch.int64),
        edge_cell_shifts=torch.zeros(0, 3),
        structure_index=torch.tensor([0, 0, 2]),
        properties={},
    )
    values = torch.tensor([1.5, 2.5, 4.0], requires_grad=True)
    totals = sum_per_structure(values, graph)
    assert totals.tolist() == [4.0, 0.0, 4.0]
    (totals * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert values.grad.tolist() == [1.0, 1.0, 3.0]


def test_batch_graphs_offsets(dimer):
    single = _graph(
        positions=[[0.5, 0.5, 0.5]],
        cell=torch.eye(3) * 2.0,
        edges=[[0, 0], [0, 0]],
        shifts=[[1, 0, 0], [-1, 0, 0]],
        pbc=(True, False, True),
        species=[1],
    )
    batch = batch_graphs([dimer, single, dimer])
    assert number_of_atoms(batch) == 5
    assert number_of_structures(batch) == 3
    assert number_of_edges(batch) == 8
    assert batch.structure_index.tolist() == [0, 0, 1, 2, 2]
    assert batch.species.tolist() == [0, 1, 1, 0, 1]
    # edges of the 2nd graph offset by 2 atoms, of the 3rd by 3
    assert batch.edge_index.tolist() == [
        [0, 1, 0, 2, 2, 3, 4, 3],
        [1, 0, 0, 2, 2, 4, 3, 3],
    ]
    assert batch.pbc.tolist() == [[True] * 3, [True, False, True], [True] * 3]
    assert batch.cell.shape == (3, 3, 3)
    torch.testing.assert_close(batch.cell[1], torch.eye(3, dtype=torch.float64) * 2)
    # edge vectors of the batch are those of the parts
    torch.testing.assert_close(
        edge_vectors(batch),
        torch.cat([edge_vectors(dimer), edge_vectors(single), edge_vectors(dimer)]),
    )


def test_batch_of_batches_offsets_structures(dimer):
    pair = batch_graphs([dimer, dimer])
    quad = batch_graphs([pair, pair])
    assert number_of_structures(quad) == 4
    assert quad.structure_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert quad.edge_index[:, -3:].tolist() == [[6, 7, 6], [7, 6, 6]]


def test_batch_graphs_rejects_empty_list():
    with pytest.raises(ValueError, match="at least one graph"):
        batch_graphs([])


def test_graph_to_casts_floats_only(dimer):
    moved = graph_to(dimer, torch.device("cpu"), torch.float32)
    assert moved.positions.dtype == torch.float32
    assert moved.cell.dtype == torch.float32
    assert moved.edge_cell_shifts.dtype == torch.float32
    assert moved.pbc.dtype == torch.bool
    assert moved.species.dtype == torch.int64
    assert moved.edge_index.dtype == torch.int64
    assert moved.structure_index.dtype == torch.int64
    torch.testing.assert_close(moved.positions, dimer.positions.float())
    torch.testing.assert_close(moved.edge_cell_shifts, dimer.edge_cell_shifts.float())
    assert torch.equal(moved.edge_index, dimer.edge_index)
    # and back to float64 is exact for these values
    back = graph_to(moved, torch.device("cpu"), torch.float64)
    torch.testing.assert_close(edge_vectors(back), edge_vectors(dimer), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_to_cuda(dimer):
    moved = graph_to(dimer, torch.device("cuda"), torch.float64)
    assert all(field.device.type == "cuda" for field in moved)
    torch.testing.assert_close(edge_vectors(moved).cpu(), edge_vectors(dimer))


def test_with_positions_and_cell(dimer):
    positions = dimer.positions * 2
    cell = dimer.cell * 2
    scaled = with_positions_and_cell(dimer, positions, cell)
    assert scaled.positions is positions
    assert scaled.cell is cell
    assert scaled.edge_index is dimer.edge_index
    assert scaled.edge_cell_shifts is dimer.edge_cell_shifts
    assert scaled.species is dimer.species
    assert scaled.pbc is dimer.pbc
    assert scaled.structure_index is dimer.structure_index
    # the original is untouched and the vectors scale with the geometry
    torch.testing.assert_close(edge_vectors(scaled), 2 * edge_vectors(dimer))
    assert dimer.positions[1].tolist() == [1.0, 2.0, 3.0]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_graph_is_torchscript_compatible(dimer):
    scripted = torch.jit.script(edge_vectors)
    torch.testing.assert_close(scripted(dimer), edge_vectors(dimer))
    scripted_sum = torch.jit.script(sum_per_structure)
    torch.testing.assert_close(
        scripted_sum(torch.tensor([1.0, 2.0]).double(), dimer),
        torch.tensor([3.0]).double(),
    )
