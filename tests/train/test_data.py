import ase.io
import numpy as np
import pytest
import torch
from helpers import emt_structures

from pes_calc.graph import batch_graphs
from pes_calc.train.data import (
    DatasetError,
    LabelKeys,
    batch_order,
    extract_labels,
    labelled_graphs,
    load_graphs,
    species_in,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "cu.xyz"
    ase.io.write(path, emt_structures(3, seed=0), format="extxyz")
    return path


def test_labels_come_back_from_extxyz_with_nan_for_missing_stress(dataset):
    graphs = load_graphs(dataset, ["Cu"], cutoff=3.0)
    reference = emt_structures(3, seed=0)
    assert len(graphs) == 4
    for graph, atoms in zip(graphs, reference, strict=True):
        assert graph.properties["energy"].item() == pytest.approx(
            atoms.get_potential_energy()
        )
        np.testing.assert_allclose(
            graph.properties["forces"].numpy(), atoms.get_forces(), atol=1e-7
        )
    # ASE Voigt (xx yy zz yz xz xy) → full symmetric matrix
    voigt = reference[0].get_stress()
    stress = graphs[0].properties["stress"][0].numpy()
    np.testing.assert_allclose(
        [
            stress[0, 0],
            stress[1, 1],
            stress[2, 2],
            stress[1, 2],
            stress[0, 2],
            stress[0, 1],
        ],
        voigt,
        atol=1e-9,
    )
    np.testing.assert_allclose(stress, stress.T)
    # the cluster has no stress: NaN keeps the batch one shape
    assert torch.isnan(graphs[-1].properties["stress"]).all()
    batch = batch_graphs(graphs)
    assert batch.properties["energy"].shape == (4,)
    assert batch.properties["forces"].shape == (3 * 8 + 4, 3)
    assert batch.properties["stress"].shape == (4, 3, 3)


def test_custom_keys_in_info_and_arrays(tmp_path):
    structures = emt_structures(2, seed=1, cluster=False)
    for atoms in structures:
        atoms.info["dft_energy"] = atoms.get_potential_energy()
        atoms.arrays["dft_forces"] = atoms.get_forces()
        atoms.calc = None
    path = tmp_path / "custom.xyz"
    ase.io.write(path, structures, format="extxyz")
    graphs = load_graphs(path, ["Cu"], 3.0, LabelKeys("dft_energy", "dft_forces", None))
    assert sorted(graphs[0].properties) == ["energy", "forces"]
    assert graphs[1].properties["energy"].item() == pytest.approx(
        structures[1].info["dft_energy"]
    )


def test_missing_keys_are_named(dataset):
    structures = ase.io.read(dataset, ":")
    with pytest.raises(DatasetError, match="no structure has the energy key 'E_dft'"):
        extract_labels(structures, LabelKeys(energy="E_dft"))
    with pytest.raises(DatasetError, match="forces key 'F_dft'"):
        extract_labels(structures, LabelKeys(forces="F_dft"))
    for atoms in structures:
        atoms.calc.results.pop("forces")
    # the default forces key may be absent: energy-only data, with a warning
    with pytest.warns(UserWarning, match="no forces labels"):
        labels = extract_labels(structures, LabelKeys())
    assert "forces" not in labels[0]


def test_missing_file_and_unknown_species(tmp_path, dataset):
    with pytest.raises(DatasetError, match="no dataset file"):
        load_graphs(tmp_path / "absent.xyz", ["Cu"], 3.0)
    with pytest.raises(ValueError, match="Cu"):
        load_graphs(dataset, ["Ag"], 3.0)


def test_batch_order_is_reproducible_and_shards_evenly():
    first = batch_order(10, 3, shuffle=True, seed=4, epoch=2)
    assert first == batch_order(10, 3, shuffle=True, seed=4, epoch=2)
    assert first != batch_order(10, 3, shuffle=True, seed=4, epoch=3)
    assert sorted(i for batch in first for i in batch) == list(range(10))
    ranks = [
        batch_order(10, 2, shuffle=True, seed=4, epoch=2, rank=r, world_size=3)
        for r in range(3)
    ]
    # every rank gets as many batches; together they cover every graph
    assert len({len(r) for r in ranks}) == 1
    assert {i for r in ranks for batch in r for i in batch} == set(range(10))


def test_species_in_orders_by_atomic_number():
    structures = [ase.Atoms("OH2"), ase.Atoms("CuC")]
    assert species_in(structures) == ["H", "C", "O", "Cu"]
    graphs = labelled_graphs(
        [ase.Atoms("OH2", positions=np.eye(3))], [{}], ["H", "O"], 2.0
    )
    assert graphs[0].species.tolist() == [1, 0, 0]


def test_a_broken_structure_is_named(tmp_path):
    structures = emt_structures(2, seed=2, cluster=False)
    structures[1].positions[3, 0] = np.nan
    with pytest.raises(DatasetError, match="structure 1: .*(NaN|finite)"):
        labelled_graphs(structures, [{}, {}], ["Cu"], 3.0, name="mine.xyz")
