"""AOTInductor packages of long-range SOAP-BPNN models (Ewald and PME).

The cell-dependent integer data (Ewald's k-vector indices, PME's mesh shape, the
direct-sum pairs) is computed outside the compiled graph
(`pes_calc.nn.long_range_export.export_inputs`), so one package serves every cell.
Its formulation is first checked against torch-pme directly (no compile), then one
tiny float64 model per method is compiled once for the module (1-3 minutes each) and
checked against eager on cells of other shapes and sizes than it was traced on.
"""

from __future__ import annotations

import copy

import ase
import ase.build
import numpy as np
import pytest
import torch

from pes_calc import build_model, keys
from pes_calc.artefacts import AOTInductorPotential, load_artefact
from pes_calc.compile import compile_model
from pes_calc.graph import batch_graphs
from pes_calc.neighbors import atoms_to_graph
from pes_calc.nn.long_range_export import KVECTORS, MESH, export_inputs

# a fallback to eager warns: a test that meant the compiled code must not pass on it
pytestmark = pytest.mark.filterwarnings("error:.*eager model instead:UserWarning")

METHODS = ["ewald", "pme"]


def long_range_model(method: str):
    """A tiny Na/Cl model whose latent charges are redrawn to order 1, so that the
    Coulomb term matters."""
    model = build_model(
        "soap_bpnn",
        ["Na", "Cl"],
        model_dtype="float64",
        seed=0,
        soap={"max_angular": 2, "max_radial": 2},
        bpnn={"num_hidden_layers": 1, "num_neurons_per_layer": 6},
        long_range={"enable": True, "use_ewald": method == "ewald"},
    )
    weight = model.architecture.charges.weight
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=generator, dtype=weight.dtype))
    return model.eval()


def structures() -> dict[str, ase.Atoms]:
    """Cells of different shapes and sizes (so different k-vector sets and meshes),
    a slab and a molecule, none of them the example graph's."""
    cubic = ase.build.bulk("NaCl", "rocksalt", a=5.0, cubic=True)
    cubic.rattle(0.1, seed=1)
    triclinic = ase.build.bulk("NaCl", "rocksalt", a=5.0) * (2, 2, 1)
    triclinic.cell = triclinic.cell.array + [
        [0.3, 0.1, 0.0],
        [0.0, 0.2, -0.3],
        [0.1, 0.0, 0.4],
    ]
    triclinic.rattle(0.1, seed=2)
    supercell = cubic * (2, 1, 1)
    supercell.rattle(0.05, seed=3)
    slab = ase.build.fcc111("Cu", size=(2, 2, 2), vacuum=4.0, a=3.8)
    slab.pbc = (True, True, False)
    slab.set_chemical_symbols(["Na", "Cl"] * 4)
    slab.rattle(0.05, seed=4)
    molecule = ase.Atoms(
        "NaClNaCl",
        positions=[[0, 0, 0], [2.4, 0, 0], [0, 2.5, 0.3], [2.5, 2.5, 0.1]],
    )
    return {
        "cubic": cubic,
        "triclinic": triclinic,
        "supercell": supercell,
        "slab": slab,
        "molecule": molecule,
    }


def graph_of(model, atoms):
    return atoms_to_graph(atoms, model.species, model.cutoff)


def all_graphs(model):
    graphs = {name: graph_of(model, atoms) for name, atoms in structures().items()}
    graphs["batch"] = batch_graphs(list(graphs.values()))
    return graphs


def assert_agree(got, expected, rtol=1e-9):
    for name in (keys.ENERGY, keys.ENERGIES, keys.FORCES, keys.STRESS):
        value, reference = got[name].detach(), expected[name].detach()
        scale = float(reference.abs().max())
        error = float((value - reference).abs().max())
        assert error <= rtol * scale + 1e-13, (name, error, scale)


@pytest.mark.parametrize("method", METHODS)
def test_export_formulation_equals_torchpme(method):
    """The compiled graph's sums (k-vectors from integer indices, the masked mesh,
    the batched slab correction and direct sum), run eagerly, equal torch-pme's."""
    model = long_range_model(method)
    exported = copy.deepcopy(model)
    for module in exported.modules():
        if hasattr(module, "prepare_for_export"):
            module.prepare_for_export()
    spec = exported.architecture.long_range.export_spec()
    graphs = all_graphs(model)
    if method == "pme":  # one mesh per graph: the package splits batches
        graphs.pop("batch")
        graphs["molecule+cubic"] = batch_graphs([graphs["molecule"], graphs["cubic"]])
    for graph in graphs.values():
        inputs = graph._replace(properties=export_inputs(graph, spec))
        assert_agree(exported(inputs), model(graph), rtol=1e-12)
    if method == "ewald":  # different cells, different k-vector sets
        sizes = {
            name: export_inputs(graphs[name], spec)[KVECTORS].shape[0]
            for name in ("cubic", "triclinic", "supercell", "slab")
        }
        assert len(set(sizes.values())) == 4, sizes
    else:
        meshes = {
            tuple(export_inputs(graphs[name], spec)[MESH].shape)
            for name in ("cubic", "triclinic", "supercell", "slab")
        }
        assert len(meshes) >= 3, meshes


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PES_CALC_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module", params=METHODS)
def compiled(request, cache, tmp_path_factory):
    """(eager model, loaded package): the load-time check against eager must pass
    (a fallback warning is an error here)."""
    model = long_range_model(request.param)
    path = tmp_path_factory.mktemp(request.param) / "model.pt2"
    compile_model(model, path, mode="aotinductor")
    loaded, metadata = load_artefact(path)
    assert isinstance(loaded, AOTInductorPotential)
    assert metadata["long_range_inputs"]["method"] == request.param
    return model, loaded


@pytest.mark.parametrize(
    "name", ["cubic", "triclinic", "supercell", "slab", "molecule", "batch"]
)
def test_compiled_equals_eager(compiled, name):
    model, loaded = compiled
    graph = all_graphs(model)[name]
    assert_agree(loaded(graph, True, True), model(graph, True, True))


def test_compiled_forces_are_the_energy_gradient(compiled):
    """Forces of the package against central differences of its own energy."""
    model, loaded = compiled
    atoms = structures()["triclinic"]

    def energy(positions):
        moved = atoms.copy()
        moved.positions = positions
        return float(loaded(graph_of(model, moved), False, False)[keys.ENERGY][0])

    forces = loaded(graph_of(model, atoms), True, False)[keys.FORCES].numpy()
    h = 1e-5
    for i, axis in [(0, 0), (3, 1), (5, 2), (7, 0)]:
        step = np.zeros_like(atoms.positions)
        step[i, axis] = h
        numerical = -(energy(atoms.positions + step) - energy(atoms.positions - step))
        assert numerical / (2 * h) == pytest.approx(forces[i, axis], abs=1e-7)


def test_the_coulomb_term_is_not_trivial(compiled):
    """Without the Coulomb feature the stress and forces change: the comparisons
    above test the long-range sums, not only the short-range part."""
    model, loaded = compiled
    graph = all_graphs(model)["triclinic"]
    off = copy.deepcopy(model)
    with torch.no_grad():
        off.architecture.last_layer.weight[0, -1] = 0.0
    with_coulomb, without = loaded(graph), off(graph)
    assert float((with_coulomb[keys.FORCES] - without[keys.FORCES]).abs().max()) > 1e-3
    assert float((with_coulomb[keys.STRESS] - without[keys.STRESS]).abs().max()) > 1e-5
