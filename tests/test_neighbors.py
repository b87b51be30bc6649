"""Tests of `pes_calc.neighbors`: graphs against ASE's neighbor list, and bad input."""

import re

import ase
import ase.build
import numpy as np
import pytest
import torch
from ase.neighborlist import neighbor_list as ase_neighbor_list

from pes_calc.graph import edge_vectors
from pes_calc.neighbors import UnknownSpeciesError, atoms_to_graph, species_indices

SPECIES = ["Cu", "Ag"]
CUTOFF = 5.0


def _triclinic() -> ase.Atoms:
    rng = np.random.default_rng(1)
    cell = np.array([[5.1, 0.0, 0.0], [1.3, 4.7, 0.0], [0.9, -1.1, 5.3]])
    atoms = ase.Atoms(
        "Cu5Ag3",
        scaled_positions=rng.uniform(size=(8, 3)),
        cell=cell,
        pbc=True,
    )
    # positions outside the cell must work too
    atoms.positions[0] += cell[0] * 1.0 + cell[2] * -1.0
    return atoms


def _small_cell() -> ase.Atoms:
    """A cell much smaller than twice the cutoff: every atom sees many images."""
    cell = np.array([[2.2, 0.0, 0.0], [0.6, 2.4, 0.0], [-0.4, 0.3, 2.6]])
    return ase.Atoms(
        "CuAg",
        scaled_positions=[[0.1, 0.2, 0.3], [0.55, 0.45, 0.8]],
        cell=cell,
        pbc=True,
    )


def _slab_zero_vector() -> ase.Atoms:
    """pbc (T, T, F) and a zero third cell vector, as ase.build makes without vacuum."""
    atoms = ase.build.fcc111("Cu", (2, 2, 3), a=3.6)
    atoms.symbols[::4] = "Ag"
    atoms.rattle(0.05, seed=2)
    assert atoms.pbc.tolist() == [True, True, False]
    assert np.all(atoms.cell[2] == 0.0)
    return atoms


def _slab_with_vacuum() -> ase.Atoms:
    atoms = ase.build.fcc100("Ag", (2, 2, 3), a=4.0, vacuum=4.0)
    atoms.symbols[1::3] = "Cu"
    atoms.rattle(0.05, seed=3)
    atoms.pbc = [True, False, True]  # a non-z non-periodic direction
    atoms.cell[2] += [0.7, 0.0, 0.0]  # make it triclinic
    return atoms


def _cluster() -> ase.Atoms:
    atoms = ase.Atoms(
        "Cu4Ag2",
        positions=np.random.default_rng(4).uniform(-3.0, 3.0, size=(6, 3)),
    )
    assert not atoms.pbc.any() and np.all(atoms.cell.array == 0.0)
    return atoms


STRUCTURES = {
    "triclinic": _triclinic,
    "small_cell": _small_cell,
    "slab_zero_vector": _slab_zero_vector,
    "slab_with_vacuum": _slab_with_vacuum,
    "cluster": _cluster,
}


def _edge_set(edge_index, shifts) -> set:
    edge_index = np.asarray(edge_index)
    shifts = np.asarray(shifts)
    assert np.all(shifts == np.round(shifts)), "cell shifts must be integers"
    return {
        (int(i), int(j), tuple(int(s) for s in shift))
        for i, j, shift in zip(
            edge_index[0], edge_index[1], shifts.round().astype(int), strict=True
        )
    }


def _ase_edge_set(atoms: ase.Atoms, cutoff: float) -> set:
    i, j, shifts = ase_neighbor_list("ijS", atoms, cutoff)
    return _edge_set(np.stack([i, j]), shifts)


def _graph_edge_set(graph) -> set:
    return _edge_set(graph.edge_index.numpy(), graph.edge_cell_shifts.numpy())


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_edges_match_ase(name):
    atoms = STRUCTURES[name]()
    graph = atoms_to_graph(atoms, SPECIES, CUTOFF)
    expected = _ase_edge_set(atoms, CUTOFF)
    assert len(expected) > 0
    assert graph.edge_index.shape[1] == len(expected), "no duplicate edges"
    assert _graph_edge_set(graph) == expected
    # the edge vectors are those of ASE, shorter than the cutoff
    distances = torch.linalg.vector_norm(edge_vectors(graph), dim=-1)
    assert distances.max() < CUTOFF
    assert distances.min() > 0.0  # no atom is its own neighbor at zero shift
    _, _, ase_distances = ase_neighbor_list("ijd", atoms, CUTOFF)
    np.testing.assert_allclose(
        np.sort(distances.numpy()), np.sort(ase_distances), rtol=0, atol=1e-10
    )


def test_small_cell_sees_many_images():
    atoms = _small_cell()
    graph = atoms_to_graph(atoms, SPECIES, CUTOFF)
    shifts = graph.edge_cell_shifts.abs().max(dim=0).values
    assert torch.all(shifts >= 2), "images beyond the nearest must be listed"
    # an atom is a neighbor of its own images
    i, j = graph.edge_index
    assert bool(torch.any(i == j))
    # ~ (4/3 π 5³ Å³) / (13.7 Å³ per 2 atoms) ≈ 76 neighbors per atom
    assert graph.edge_index.shape[1] > 120


def test_slab_has_no_shift_along_non_periodic_direction():
    for atoms in (_slab_zero_vector(), _slab_with_vacuum()):
        graph = atoms_to_graph(atoms, SPECIES, CUTOFF)
        off = ~atoms.pbc
        assert torch.all(graph.edge_cell_shifts[:, torch.from_numpy(off)] == 0)


def test_cluster_has_no_shifts():
    graph = atoms_to_graph(_cluster(), SPECIES, CUTOFF)
    assert torch.all(graph.edge_cell_shifts == 0)
    assert graph.cell.shape == (1, 3, 3) and torch.all(graph.cell == 0)
    assert graph.pbc.tolist() == [[False, False, False]]


def test_graph_fields():
    atoms = _triclinic()
    graph = atoms_to_graph(atoms, SPECIES, CUTOFF)
    assert graph.positions.shape == (8, 3)
    assert graph.cell.shape == (1, 3, 3)
    assert graph.pbc.shape == (1, 3) and graph.pbc.dtype == torch.bool
    np.testing.assert_array_equal(graph.positions.numpy(), atoms.positions)
    np.testing.assert_array_equal(graph.cell[0].numpy(), atoms.cell.array)
    assert graph.species.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert graph.structure_index.tolist() == [0] * 8
    for field in (graph.species, graph.edge_index, graph.structure_index):
        assert field.dtype == torch.int64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_dtype(dtype):
    atoms = _triclinic()
    graph = atoms_to_graph(atoms, SPECIES, CUTOFF, dtype=dtype)
    assert graph.positions.dtype == dtype
    assert graph.cell.dtype == dtype
    assert graph.edge_cell_shifts.dtype == dtype
    assert graph.species.dtype == torch.int64
    assert graph.edge_index.dtype == torch.int64
    # the edge set is decided in float64 whatever the graph dtype
    assert _graph_edge_set(graph) == _ase_edge_set(atoms, CUTOFF)


def test_default_dtype_is_float64_and_not_the_global_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        graph = atoms_to_graph(_cluster(), SPECIES, CUTOFF)
    finally:
        torch.set_default_dtype(previous)
    assert graph.positions.dtype == torch.float64


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_vesin_torch_backend_matches_vesin(name):
    atoms = STRUCTURES[name]()
    numpy_graph = atoms_to_graph(atoms, SPECIES, CUTOFF, backend="vesin")
    torch_graph = atoms_to_graph(atoms, SPECIES, CUTOFF, backend="vesin-torch")
    assert _graph_edge_set(torch_graph) == _graph_edge_set(numpy_graph)
    assert torch_graph.edge_index.dtype == torch.int64
    assert torch_graph.edge_cell_shifts.dtype == torch.float64


def test_vesin_torch_backend_float32():
    atoms = _triclinic()
    graph = atoms_to_graph(
        atoms, SPECIES, CUTOFF, backend="vesin-torch", dtype=torch.float32
    )
    assert graph.edge_cell_shifts.dtype == torch.float32
    assert _graph_edge_set(graph) == _ase_edge_set(atoms, CUTOFF)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_matches_cpu():
    atoms = _triclinic()
    graph = atoms_to_graph(atoms, SPECIES, CUTOFF, device="cuda")
    assert graph.positions.device.type == "cuda"
    assert graph.edge_index.device.type == "cuda"
    edges = _edge_set(
        graph.edge_index.cpu().numpy(), graph.edge_cell_shifts.cpu().numpy()
    )
    assert edges == _ase_edge_set(atoms, CUTOFF)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown neighbor-list backend 'matscipy'"):
        atoms_to_graph(_cluster(), SPECIES, CUTOFF, backend="matscipy")


# ---- bad input -------------------------------------------------------------------


def test_unknown_element_names_it_and_the_model_species():
    atoms = _cluster()
    atoms.symbols[2] = "Au"
    with pytest.raises(UnknownSpeciesError) as info:
        atoms_to_graph(atoms, SPECIES, CUTOFF)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert re.search(r"\bAu\b", message)
    assert "Cu, Ag" in message


def test_several_unknown_elements_all_named():
    atoms = _cluster()
    atoms.symbols[0] = "Pt"
    atoms.symbols[3] = "H"
    with pytest.raises(ValueError, match=r"contains H, Pt.*species are Cu, Ag"):
        atoms_to_graph(atoms, SPECIES, CUTOFF)


def test_species_indices():
    assert species_indices(["Ag", "Cu", "Ag"], SPECIES).tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="Zn"):
        species_indices(["Cu", "Zn"], SPECIES)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_positions(bad):
    atoms = _triclinic()
    atoms.positions[3, 1] = bad
    with pytest.raises(ValueError, match=r"positions of atoms \[3\] are NaN or inf"):
        atoms_to_graph(atoms, SPECIES, CUTOFF)


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_non_finite_cell(bad):
    atoms = _triclinic()
    cell = atoms.cell.array.copy()
    cell[1, 0] = bad
    atoms.cell = cell
    with pytest.raises(ValueError, match="cell contains NaN or infinite"):
        atoms_to_graph(atoms, SPECIES, CUTOFF)


def test_periodic_direction_with_zero_cell_vector():
    atoms = _slab_zero_vector()
    atoms.pbc = True  # z now periodic but its cell vector is zero
    with pytest.raises(
        ValueError, match="cell direction 2 is periodic but its cell vector is zero"
    ):
        atoms_to_graph(atoms, SPECIES, CUTOFF)


def test_periodic_but_zero_cell():
    atoms = _cluster()
    atoms.pbc = [False, True, False]
    with pytest.raises(ValueError, match="cell direction 1 is periodic"):
        atoms_to_graph(atoms, SPECIES, CUTOFF)


def test_fully_periodic_flat_cell():
    atoms = _triclinic()
    cell = atoms.cell.array.copy()
    cell[2] = cell[0] + cell[1]  # non-zero vectors, no volume
    atoms.cell = cell
    with pytest.raises(ValueError, match="no volume"):
        atoms_to_graph(atoms, SPECIES, CUTOFF)
