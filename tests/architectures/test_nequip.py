"""NequIP: nequip's hyperparameters and defaults, per-type scales and shifts,
energy-only models and their force modifier, per-edge-type cutoffs, neighbor
normalisation, equivariance of the internal features, and the ZBL pair potential.

The shared physics contract (finite differences, invariances of energy and forces,
extensivity, batching, isolated atoms, smooth cutoff) runs in tests/test_contract.py.
"""

from __future__ import annotations

import ase
import ase.build
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from e3nn import o3
from e3nn.util.test import assert_equivariant, equivariance_error
from helpers import bulk, run

from pes_calc import build_model, keys, save_model
from pes_calc.architectures.nequip import DEFAULT_HYPERS, hidden_irreps
from pes_calc.artefacts import load_artefact, read_artefact_metadata
from pes_calc.cli import main as cli
from pes_calc.compile import compile_model
from pes_calc.graph import edge_vectors, with_positions_and_cell
from pes_calc.neighbors import atoms_to_graph
from pes_calc.nn.zbl import COULOMB_CONSTANT
from pes_calc.testing import CHECKS, Subject, random_rotation

SMALL = {
    "r_max": 4.0,
    "num_layers": 2,
    "num_features": 8,
    "seed": 0,
    "model_dtype": "float64",
}
SHIFTS = [-3.5, -1.25]


def small_model(species=("Cu", "Ag"), **hypers):
    return build_model("nequip", list(species), **{**SMALL, **hypers})


def cluster(symbols="CuAgCuCuAg", seed=0) -> ase.Atoms:
    """A compact cluster: every pair within 4 Å, so all atoms interact."""
    rng = np.random.default_rng(seed)
    count = len(ase.Atoms(symbols))
    return ase.Atoms(symbols, positions=rng.uniform(0.0, 2.2, size=(count, 3)))


def dimer(a: str, b: str, distance: float) -> ase.Atoms:
    return ase.Atoms([a, b], positions=[[0.0, 0.0, 0.0], [distance, 0.0, 0.0]])


# ------------------------------------------------------------ hyperparameters


def test_default_hypers_are_nequips():
    expected = {
        "num_layers": 4,
        "l_max": 1,
        "parity": True,
        "num_features": 32,
        "radial_mlp_depth": 2,
        "radial_mlp_width": 64,
        "num_bessels": 8,
        "bessel_trainable": False,
        "polynomial_cutoff_p": 6,
    }
    assert {key: DEFAULT_HYPERS[key] for key in expected} == expected
    assert DEFAULT_HYPERS["per_edge_type_cutoff"] is None
    assert DEFAULT_HYPERS["avg_num_neighbors"] is None
    assert DEFAULT_HYPERS["pair_potential"] is None


def test_default_build_follows_the_defaults():
    model = build_model("nequip", ["Cu"], seed=0)
    architecture = model.architecture
    assert model.config["model"]["num_layers"] == 4
    assert model.cutoff == architecture.cutoff == DEFAULT_HYPERS["r_max"] == 5.0
    assert architecture.polynomial_cutoff_p == 6.0
    assert len(architecture.layers) == 4
    # l_max 1 with parity: 32 copies of each (l, p) up to l = 1 that the tensor
    # products can reach from the 0e embedding (0o first after three convolutions)
    assert architecture.layers[0].irreps_out == o3.Irreps("32x0e+32x1o")
    assert architecture.layers[1].irreps_out == o3.Irreps("32x0e+32x1e+32x1o")
    assert architecture.layers[2].irreps_out == o3.Irreps("32x0e+32x0o+32x1e+32x1o")
    assert architecture.layers[-1].irreps_out == o3.Irreps("32x0e")
    assert architecture.spherical_harmonics.irreps_out == o3.Irreps("0e+1o")
    # Bessel basis: 8 fixed frequencies nπ
    frequencies = architecture.bessel.frequencies
    assert not frequencies.requires_grad
    np.testing.assert_allclose(frequencies.detach().numpy(), np.pi * np.arange(1, 9))
    # radial MLP: 8 Bessels → 64 → 64 → one weight per tensor-product path
    for layer in architecture.layers:
        linears = [m for m in layer.radial if isinstance(m, torch.nn.Linear)]
        assert [m.in_features for m in linears] == [8, 64, 64]
        assert linears[-1].out_features == layer.tensor_product.weight_numel
    # readout: no hidden layer, a bias-free linear map of the 32 scalars
    assert architecture.last_layer.in_features == 32
    assert architecture.last_layer.bias is None
    outputs = run(model, bulk(["Cu"] * 4))
    assert np.isfinite(outputs[keys.ENERGY]).all()
    assert outputs[keys.FORCES].shape == (4, 3)
    assert outputs[keys.LAST_LAYER_FEATURES].shape == (4, 32)


def test_call_from_the_issue():
    model = build_model(
        "nequip", ["Cu"], r_max=5.0, l_max=2, num_layers=4, num_features=32
    )
    assert model.species == ["Cu"] and model.cutoff == 5.0
    assert model.architecture.layers[2].irreps_out == o3.Irreps(
        "32x0e+32x0o+32x1e+32x1o+32x2e+32x2o"
    )
    atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=1)
    outputs = run(model, atoms)
    assert outputs[keys.ENERGY].shape == (1,)
    assert np.isfinite(outputs[keys.ENERGY]).all()
    assert outputs[keys.FORCES].shape == (4, 3)
    assert np.isfinite(outputs[keys.FORCES]).all()
    assert outputs[keys.STRESS].shape == (1, 3, 3)


def test_hidden_irreps():
    assert hidden_irreps(4, 2, True) == o3.Irreps("4x0e+4x0o+4x1e+4x1o+4x2e+4x2o")
    # without parity only the spherical-harmonic parities (-1)^l
    assert hidden_irreps(4, 3, False) == o3.Irreps("4x0e+4x1o+4x2e+4x3o")


def test_structural_hyperparameters():
    model = small_model(
        num_bessels=5,
        bessel_trainable=True,
        radial_mlp_depth=1,
        radial_mlp_width=7,
        type_embed_num_features=3,
        readout_mlp_hidden_layers_depth=2,
        readout_mlp_hidden_layers_width=6,
        polynomial_cutoff_p=4,
    )
    architecture = model.architecture
    assert architecture.bessel.frequencies.shape == (5,)
    assert architecture.bessel.frequencies.requires_grad
    assert architecture.polynomial_cutoff_p == 4.0
    assert architecture.type_embedding.out_features == 3
    assert architecture.layers[0].linear_in.irreps_in == o3.Irreps("3x0e")
    linears = [
        m for m in architecture.layers[0].radial if isinstance(m, torch.nn.Linear)
    ]
    assert [(m.in_features, m.out_features) for m in linears[:-1]] == [(5, 7)]
    assert [
        m.out_features
        for m in architecture.readout_hidden
        if isinstance(m, torch.nn.Linear)
    ] == [6, 6]
    outputs = run(model, bulk())
    assert outputs[keys.LAST_LAYER_FEATURES].shape == (4, 6)
    assert np.isfinite(outputs[keys.ENERGY]).all()


def test_unknown_hyperparameter_is_an_error():
    with pytest.raises(ValueError, match="num_feature"):
        build_model("nequip", ["Cu"], num_feature=8)


# ------------------------------------------------------ per-type scales and shifts


def test_shifts_are_the_energies_of_dissociated_atoms():
    model = small_model(per_type_energy_shifts=SHIFTS)
    # every pair farther apart than r_max = 4 Å: no edges at all
    atoms = ase.Atoms(
        ["Cu", "Ag", "Cu", "Ag"],
        positions=[[0, 0, 0], [4.5, 0, 0], [0, 4.5, 0], [4.5, 4.5, 0.5]],
    )
    outputs = run(model, atoms)
    np.testing.assert_array_equal(outputs[keys.ENERGIES], [-3.5, -1.25, -3.5, -1.25])
    np.testing.assert_array_equal(outputs[keys.ENERGY], [-9.5])
    np.testing.assert_array_equal(outputs[keys.FORCES], np.zeros((4, 3)))
    for symbol, shift in zip(["Cu", "Ag"], SHIFTS, strict=True):
        single = run(model, ase.Atoms([symbol], positions=[[0.0, 0.0, 0.0]]))
        np.testing.assert_array_equal(single[keys.ENERGY], [shift])
    # ... while bonded atoms are not at their shifts
    bonded = run(model, bulk())
    assert np.abs(bonded[keys.ENERGIES] - np.array(SHIFTS * 2)).min() > 1e-6


def test_scales_multiply_the_raw_energies():
    reference = small_model(per_type_energy_shifts=SHIFTS)
    scaled = small_model(per_type_energy_shifts=SHIFTS, per_type_energy_scales=2.0)
    per_type = small_model(
        per_type_energy_shifts=SHIFTS, per_type_energy_scales=[2.0, 0.5]
    )
    atoms = bulk()
    shifts = np.array(SHIFTS)[[0, 1, 0, 1]]
    raw = run(reference, atoms)[keys.ENERGIES] - shifts
    assert np.abs(raw).min() > 1e-6  # a bonded structure: the raw energies are not 0
    np.testing.assert_allclose(
        run(scaled, atoms)[keys.ENERGIES] - shifts, 2.0 * raw, rtol=1e-12, atol=1e-14
    )
    np.testing.assert_allclose(
        run(per_type, atoms)[keys.ENERGIES] - shifts,
        np.array([2.0, 0.5, 2.0, 0.5]) * raw,
        rtol=1e-12,
        atol=1e-14,
    )
    np.testing.assert_allclose(
        run(scaled, atoms)[keys.FORCES],
        2.0 * run(reference, atoms)[keys.FORCES],
        rtol=1e-12,
        atol=1e-14,
    )


def test_wrong_number_of_per_type_values_is_an_error():
    with pytest.raises(ValueError, match="per_type_energy_shifts"):
        small_model(per_type_energy_shifts=[1.0, 2.0, 3.0])


# ------------------------------------------------------------ energy-only models


def test_energy_only_model_has_no_forces_or_stress():
    model = small_model(do_derivatives=False)
    outputs = run(model, bulk())
    assert set(outputs) == {keys.ENERGY, keys.ENERGIES, keys.LAST_LAYER_FEATURES}
    full = run(small_model(), bulk())
    np.testing.assert_array_equal(outputs[keys.ENERGY], full[keys.ENERGY])


def test_enable_force_stress_output_modifier(tmp_path):
    model = small_model(do_derivatives=False, per_type_energy_scales=5.0)
    path = tmp_path / "model.pt"
    compile_model(model, path, modifiers=["enable_ForceStressOutput"])
    assert model.do_derivatives is False  # compile_model works on a copy
    metadata = read_artefact_metadata(path)
    assert metadata["modifiers"] == ["enable_ForceStressOutput"]
    assert metadata["do_derivatives"] is True
    subject = Subject(path)
    forces = subject(subject.graph(subject.bulk()))[keys.FORCES]
    assert forces.shape == (8, 3) and np.abs(forces).max() > 1e-2
    CHECKS["forces_finite_differences"](subject)


def test_cli_compile_with_modifier(tmp_path):
    model = small_model(do_derivatives=False)
    save_model(model, tmp_path / "m.safetensors")
    result = CliRunner().invoke(
        cli,
        [
            "compile",
            str(tmp_path / "m.safetensors"),
            "-o",
            str(tmp_path / "m.pt"),
            "--modifiers",
            "enable_ForceStressOutput",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    compiled, metadata = load_artefact(tmp_path / "m.pt")
    assert metadata["modifiers"] == ["enable_ForceStressOutput"]
    atoms = bulk()
    graph = atoms_to_graph(atoms, ["Cu", "Ag"], 4.0)
    outputs = compiled(graph, True, True)
    assert outputs[keys.FORCES].shape == (4, 3)
    assert outputs[keys.STRESS].shape == (1, 3, 3)
    np.testing.assert_allclose(
        outputs[keys.ENERGY].detach().numpy(),
        run(model, atoms)[keys.ENERGY],
        rtol=1e-12,
    )
    # an unknown modifier is refused by the command line
    result = CliRunner().invoke(
        cli,
        [
            "compile",
            str(tmp_path / "m.safetensors"),
            "-o",
            str(tmp_path / "n.pt"),
            "--modifiers",
            "enable_Everything",
        ],
    )
    assert result.exit_code != 0
    assert not (tmp_path / "n.pt").exists()


# ------------------------------------------------------- per-edge-type cutoffs

PAIR_CUTOFF = {"Cu": {"Ag": 3.5}, "Ag": {"Cu": 3.5}}


def test_per_edge_type_cutoff_table():
    model = small_model(per_edge_type_cutoff={"Cu": {"Ag": 3.5}, "Ag": 3.0})
    np.testing.assert_array_equal(
        model.architecture.edge_cutoffs.cutoffs.numpy(), [[4.0, 3.5], [3.0, 3.0]]
    )


def test_edge_beyond_its_pair_cutoff_contributes_nothing():
    model = small_model(per_type_energy_shifts=SHIFTS, per_edge_type_cutoff=PAIR_CUTOFF)
    plain = small_model(per_type_energy_shifts=SHIFTS)
    separated = run(model, dimer("Cu", "Ag", 10.0))
    # 3.8 Å: inside r_max = 4 Å (an edge of the graph) but beyond the 3.5 Å Cu–Ag cutoff
    outputs = run(model, dimer("Cu", "Ag", 3.8))
    np.testing.assert_array_equal(outputs[keys.ENERGIES], separated[keys.ENERGIES])
    np.testing.assert_array_equal(outputs[keys.ENERGIES], SHIFTS)
    np.testing.assert_array_equal(outputs[keys.FORCES], np.zeros((2, 3)))
    # without the pair cutoff the same dimer interacts
    assert np.abs(run(plain, dimer("Cu", "Ag", 3.8))[keys.ENERGY] - sum(SHIFTS)) > 1e-6
    # inside the pair cutoff it interacts too
    assert np.abs(run(model, dimer("Cu", "Ag", 3.2))[keys.ENERGY] - sum(SHIFTS)) > 1e-6
    # Cu–Cu keeps r_max: a Cu–Cu dimer at 3.8 Å interacts
    copper = run(model, dimer("Cu", "Cu", 3.8))
    assert np.abs(copper[keys.ENERGY] - 2 * SHIFTS[0]) > 1e-6
    assert np.abs(copper[keys.FORCES]).max() > 1e-6


def test_per_edge_type_cutoff_is_directional():
    """{"Cu": {"Ag": 3.5}} cuts the Cu-centred edge only: the Cu atom receives no
    message from the Ag at 3.8 Å, the Ag atom still receives one from the Cu."""
    model = small_model(
        per_type_energy_shifts=SHIFTS, per_edge_type_cutoff={"Cu": {"Ag": 3.5}}
    )
    outputs = run(model, dimer("Cu", "Ag", 3.8))
    assert outputs[keys.ENERGIES][0] == SHIFTS[0]
    assert abs(outputs[keys.ENERGIES][1] - SHIFTS[1]) > 1e-6


@pytest.mark.parametrize(
    "cutoffs, message",
    [
        ({"Cu": {"Ag": 4.5}}, "r_max"),
        ({"Cu": 4.01}, "r_max"),
        ({"Cu": {"Ag": 0.0}}, "r_max"),
        ({"Cu": {"Ag": -1.0}}, "r_max"),
        ({"Zn": 3.0}, "'Zn'"),
        ({"Cu": {"Zn": 3.0}}, "'Zn'"),
    ],
)
def test_invalid_per_edge_type_cutoff(cutoffs, message):
    with pytest.raises(ValueError, match=message):
        small_model(per_edge_type_cutoff=cutoffs)


# ------------------------------------------------------------ avg_num_neighbors


def test_avg_num_neighbors_float_and_per_type():
    atoms = bulk()
    plain = run(small_model(), atoms)[keys.ENERGY]
    single = small_model(avg_num_neighbors=12.0)
    same = small_model(avg_num_neighbors={"Cu": 12.0, "Ag": 12.0})
    per_type = small_model(avg_num_neighbors={"Ag": 14.0, "Cu": 10.0})
    np.testing.assert_allclose(
        single.architecture.neighbor_normalization.numpy(),
        [12.0**-0.5] * 2,
        rtol=1e-15,
    )
    np.testing.assert_allclose(
        per_type.architecture.neighbor_normalization.numpy(),
        [10.0**-0.5, 14.0**-0.5],
        rtol=1e-15,
    )
    energies = [run(m, atoms)[keys.ENERGY][0] for m in (single, same, per_type)]
    assert energies[0] == energies[1]
    assert abs(energies[0] - plain[0]) > 1e-6
    assert abs(energies[2] - energies[0]) > 1e-6
    assert all(np.isfinite(energies))


def test_avg_num_neighbors_errors():
    with pytest.raises(ValueError, match="Ag"):
        small_model(avg_num_neighbors={"Cu": 12.0}, num_layers=1)
    with pytest.raises(ValueError, match="positive"):
        small_model(avg_num_neighbors=0.0, num_layers=1)


# ------------------------------------------------- equivariance of the features


def hidden_features(model, atoms):
    """``f(positions)``: every layer's node features and the last-layer features,
    for a fixed graph (e3nn's equivariance helper moves the positions)."""
    architecture = model.architecture
    graph = atoms_to_graph(atoms, model.species, model.cutoff)
    captured = []
    for layer in architecture.layers:
        layer.register_forward_hook(
            lambda module, inputs, output: captured.append(output)
        )

    def features(positions):
        captured.clear()
        moved = with_positions_and_cell(graph, positions, graph.cell)
        _, last = architecture(moved, edge_vectors(moved))
        return (*captured, last)

    irreps_out = [layer.irreps_out for layer in architecture.layers]
    irreps_out.append(o3.Irreps(f"{last_width(model)}x0e"))
    return features, graph.positions, irreps_out


def last_width(model):
    return model.architecture.last_layer.in_features


@pytest.mark.parametrize("l_max, parity", [(1, True), (2, True), (3, True), (2, False)])
def test_internal_features_are_equivariant(l_max, parity):
    torch.manual_seed(0)  # e3nn draws its rotations from the global generator
    model = small_model(
        species=["Cu", "Ag"], l_max=l_max, parity=parity, num_layers=4, num_features=4
    )
    features, positions, irreps_out = hidden_features(model, cluster())
    assert irreps_out[0].lmax == l_max and irreps_out[2].lmax == l_max
    # both parities of every l after the third convolution, with parity
    assert {(ir.l, ir.p) for _, ir in irreps_out[2]} == {
        (degree, p)
        for degree in range(l_max + 1)
        for p in ((1, -1) if parity else ((-1) ** degree,))
    }
    assert irreps_out[-2] == o3.Irreps("4x0e")
    outputs = features(positions)
    assert all(output.abs().max() > 1e-3 for output in outputs)
    # rotations, inversion and translations: every layer's irreps transform properly;
    # e3nn's Wigner D matrices from a rotation matrix are good to ~1e-7 only, even in
    # float64, whence the tolerance (a broken layer is off by O(0.1), see below)
    errors = assert_equivariant(
        features,
        args_in=[positions],
        irreps_in=["cartesian_points"],
        irreps_out=irreps_out,
        tolerance=1e-6,
    )
    for error in errors.values():  # the invariant outputs are exact
        assert float(error[-1]) < 1e-12 and float(error[-2]) < 1e-12
    assert set(errors) == {(0, False), (0, True), (1, False), (1, True)}
    # and the helper has teeth: calling the first layer's features invariant fails
    wrong = [o3.Irreps(f"{irreps_out[0].dim}x0e")] + irreps_out[1:]
    errors = equivariance_error(
        features, args_in=[positions], irreps_in=["cartesian_points"], irreps_out=wrong
    )
    assert max(float(error[0]) for error in errors.values()) > 1e-3


def irrep_norms(features, irreps):
    """(N, Σ mul) norms of every irrep copy: invariant under rotations and inversion."""
    blocks = [
        features[:, s].reshape(features.shape[0], mul, ir.dim).norm(dim=-1)
        for (mul, ir), s in zip(irreps, irreps.slices(), strict=True)
    ]
    return torch.cat(blocks, dim=1)


def test_float64_model_is_equivariant_to_float64_precision():
    """A float64 model's hidden features rotate exactly, not to the ~1e-8 of e3nn
    coupling coefficients computed in float32 and converted afterwards."""
    model = small_model(l_max=2, num_layers=3, num_features=4)
    architecture = model.architecture
    captured = []
    for layer in architecture.layers:
        layer.register_forward_hook(
            lambda module, inputs, output: captured.append(output)
        )
    graph = atoms_to_graph(cluster(), model.species, model.cutoff)

    def norms(transform):
        captured.clear()
        moved = with_positions_and_cell(
            graph, graph.positions @ transform.T, graph.cell
        )
        architecture(moved, edge_vectors(moved))
        return [
            irrep_norms(x, layer.irreps_out)
            for x, layer in zip(captured, architecture.layers, strict=True)
        ]

    reference = norms(torch.eye(3, dtype=torch.float64))
    rotation = torch.tensor(random_rotation(seed=5))
    for transform in (rotation, -rotation):
        for expected, actual in zip(reference, norms(transform), strict=True):
            scale = expected.abs().max()
            assert scale > 1e-3
            assert (actual - expected).abs().max() < 1e-13 * scale


@pytest.mark.parametrize("l_max", [1, 2, 3])
def test_last_layer_features_are_invariant(l_max):
    model = small_model(l_max=l_max)
    atoms = bulk()
    reference = run(model, atoms)[keys.LAST_LAYER_FEATURES]
    assert np.abs(reference).max() > 1e-3
    rotation = random_rotation(seed=7)
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ rotation.T
    rotated.cell = atoms.cell.array @ rotation.T
    np.testing.assert_allclose(
        run(model, rotated)[keys.LAST_LAYER_FEATURES], reference, rtol=0, atol=1e-10
    )
    inverted = atoms.copy()
    inverted.positions = -atoms.positions
    inverted.cell = -atoms.cell.array
    np.testing.assert_allclose(
        run(model, inverted)[keys.LAST_LAYER_FEATURES], reference, rtol=0, atol=1e-10
    )


# ------------------------------------------------------------ initialisation


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_untrained_node_features_stay_order_one(seed):
    """Every layer's node features of an untrained model on a rattled 32-atom fcc Cu
    cell are O(0.1): PyTorch's default init shrank them to ~0.01 by the third layer,
    unit-scale radial weights (no `RADIAL_INPUT_SCALE`) let the gates blow them up to
    10-10⁴."""
    model = build_model(
        "nequip", ["Cu"], avg_num_neighbors=42.0, seed=seed, model_dtype="float64"
    )
    architecture = model.architecture
    sizes = []
    for layer in architecture.layers:
        layer.register_forward_hook(
            lambda module, inputs, output: sizes.append(
                float(output.detach().pow(2).mean().sqrt())
            )
        )
    atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=0)
    graph = atoms_to_graph(atoms, model.species, model.cutoff)
    architecture(graph, edge_vectors(graph))
    assert len(sizes) == 4
    assert all(0.03 < size < 3.0 for size in sizes), sizes


# ---------------------------------------------------------------------- ZBL


def test_zbl_pair_potential():
    close = dimer("Cu", "Cu", 0.5)
    plain = run(small_model(species=["Cu"]), close)[keys.ENERGY][0]
    metal = small_model(species=["Cu"], pair_potential="ZBL")
    real = small_model(species=["Cu"], pair_potential={"name": "ZBL", "units": "real"})
    assert metal.pair_potential is not None and metal.pair_potential.units == "metal"
    assert real.pair_potential.units == "real"
    with_zbl = run(metal, close)[keys.ENERGY][0]
    # two Z = 29 nuclei 0.5 Å apart: hundreds of eV of screened repulsion
    assert with_zbl - plain > 100.0
    # the same weights: only the Coulomb constant differs between the units
    ratio = (run(real, close)[keys.ENERGY][0] - plain) / (with_zbl - plain)
    assert ratio == pytest.approx(
        COULOMB_CONSTANT["real"] / COULOMB_CONSTANT["metal"], rel=1e-10
    )
    # beyond the sum of covalent radii (2 × 1.32 Å) ZBL is switched off
    apart = dimer("Cu", "Cu", 3.0)
    assert (
        run(metal, apart)[keys.ENERGY][0]
        == run(small_model(species=["Cu"]), apart)[keys.ENERGY][0]
    )


@pytest.mark.parametrize(
    "spec",
    [
        "LJ",
        {"name": "Morse"},
        {"units": "real"},
        {"name": "ZBL", "units": "si"},
        {"name": "ZBL", "unit": "real"},
    ],
)
def test_unknown_pair_potential_is_an_error(spec):
    with pytest.raises(ValueError):
        small_model(species=["Cu"], pair_potential=spec, num_layers=1)
