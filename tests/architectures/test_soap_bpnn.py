"""SOAP-BPNN: metatrain's hyperparameters, its power spectrum, per-species networks,
last-layer features, dtypes and seeding."""

from __future__ import annotations

import copy
import math

import ase
import numpy as np
import pytest
import torch
from helpers import bulk

from pes_calc import build_model, keys, load_model, save_model
from pes_calc.architectures.soap_bpnn import DEFAULT_HYPERS
from pes_calc.graph import batch_graphs, edge_vectors
from pes_calc.neighbors import atoms_to_graph
from pes_calc.testing import (
    CHECKS,
    Subject,
    numerical_forces,
    numerical_stress,
    random_rotation,
)

SMALL_SOAP = {"max_angular": 3, "max_radial": 3}


def small_model(species=("Cu", "Ag"), **hypers):
    hypers = {"soap": SMALL_SOAP, "model_dtype": "float64", "seed": 0, **hypers}
    return build_model("soap_bpnn", list(species), **hypers).eval()


@pytest.fixture(scope="module")
def model():
    return small_model()


def graph_of(model, atoms, dtype=torch.float64):
    return atoms_to_graph(atoms, model.species, model.cutoff, dtype=dtype)


def cluster(symbols="CuAgCuCuAgCu", seed=0) -> ase.Atoms:
    rng = np.random.default_rng(seed)
    return ase.Atoms(
        symbols, positions=rng.uniform(0.0, 3.5, size=(len(ase.Atoms(symbols)), 3))
    )


def linear_layers(network):
    return [m for m in network.modules() if isinstance(m, torch.nn.Linear)]


# ------------------------------------------------------------ hyperparameters


def test_default_hypers_are_metatrains():
    assert DEFAULT_HYPERS["soap"] == {
        "max_angular": 6,
        "max_radial": 7,
        "cutoff": {"radius": 5.0, "width": 0.5},
    }
    assert DEFAULT_HYPERS["bpnn"] == {
        "num_hidden_layers": 2,
        "num_neurons_per_layer": 32,
        "layernorm": True,
    }
    assert DEFAULT_HYPERS["heads"] == {"energy": "mlp"}
    assert DEFAULT_HYPERS["zbl"] is False
    assert DEFAULT_HYPERS["long_range"]["enable"] is False

    default = build_model("soap_bpnn", ["Cu"])
    assert default.config["model"]["soap"] == DEFAULT_HYPERS["soap"]
    architecture = default.architecture
    assert architecture.cutoff == default.cutoff == 5.0
    assert architecture.cutoff_width == 0.5
    assert len(architecture.n_per_l) == 6 + 1  # l = 0..max_angular
    assert architecture.n_per_l[0] == 7 + 1  # n = 0..max_radial
    assert default.pair_potential is None
    (network,) = architecture.network.networks
    assert isinstance(network[0], torch.nn.LayerNorm)
    widths = [
        (layer.in_features, layer.out_features) for layer in linear_layers(network)
    ]
    # two hidden layers of 32, then the MLP head's one 32-wide layer
    assert widths == [(architecture.soap_size, 32), (32, 32), (32, 32)]
    assert architecture.last_layer.in_features == 32


@pytest.mark.parametrize(
    "hypers, name",
    [
        ({"soap": {"max_angualr": 3}}, "max_angualr"),
        ({"bpnn": {"num_layers": 2}}, "num_layers"),
        ({"layer_norm": True}, "layer_norm"),
        ({"long_range": {"enabled": True}}, "enabled"),
    ],
)
def test_unknown_hyperparameter_is_named(hypers, name):
    with pytest.raises(ValueError, match=name):
        build_model("soap_bpnn", ["Cu"], **hypers)


def test_long_range_defaults_are_metatrains():
    assert DEFAULT_HYPERS["long_range"] == {
        "enable": False,
        "use_ewald": False,
        "smearing": 1.4,
        "kspace_resolution": 1.33,
        "interpolation_nodes": 5,
        "charge_transfer_radius": None,  # pes_calc's own: neutral per structure
        "exclusion_degree": 1,  # pes_calc's own: torch-pme's default switch
    }
    assert small_model().architecture.long_range is None


def test_unknown_head_type():
    with pytest.raises(ValueError, match="heads.energy"):
        small_model(heads={"energy": "transformer"})


def test_heads_set_the_feature_width():
    atoms = bulk()
    soap_size = small_model().architecture.soap_size
    widths = {}
    for hidden in (0, 2):
        for head in ("linear", "mlp"):
            model = small_model(
                bpnn={"num_hidden_layers": hidden, "num_neurons_per_layer": 16},
                heads={"energy": head},
            )
            features = model(graph_of(model, atoms))[keys.LAST_LAYER_FEATURES]
            width = model.architecture.features_per_species
            assert features.shape == (len(atoms), 2 * width)
            assert model.architecture.last_layer.in_features == 2 * width
            layers = linear_layers(model.architecture.network.networks[0])
            assert len(layers) == hidden + (head == "mlp")
            widths[hidden, head] = width
    # the MLP head maps to num_neurons_per_layer; a linear head reads the last
    # hidden layer, or the power spectrum itself when there is none
    assert widths == {
        (0, "linear"): soap_size,
        (0, "mlp"): 16,
        (2, "linear"): 16,
        (2, "mlp"): 16,
    }


# ------------------------------------------------------------ last-layer features


def test_energies_are_last_layer_features_times_weights(model):
    graph = graph_of(model, bulk())
    raw, features = model.architecture(graph, edge_vectors(graph))
    weights = model.architecture.last_layer.weight  # (1, T W)
    torch.testing.assert_close(
        raw, (features @ weights.T).squeeze(-1), rtol=1e-12, atol=1e-14
    )
    assert raw.abs().max() > 1e-3  # not trivially zero
    # with unit scales, zero shifts and no ZBL the model's energies are the same
    outputs = model(graph, False, False)
    torch.testing.assert_close(outputs[keys.ENERGIES], raw, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(outputs[keys.LAST_LAYER_FEATURES], features)


def test_per_type_scales_and_shifts():
    scaled = small_model(
        per_type_energy_scales=[2.0, 3.0], per_type_energy_shifts=[0.5, -1.0]
    )
    graph = graph_of(scaled, bulk())
    raw, _ = scaled.architecture(graph, edge_vectors(graph))
    sigma = torch.tensor([2.0, 3.0], dtype=torch.float64)[graph.species]
    mu = torch.tensor([0.5, -1.0], dtype=torch.float64)[graph.species]
    outputs = scaled(graph, False, False)
    torch.testing.assert_close(outputs[keys.ENERGIES], sigma * raw + mu)
    torch.testing.assert_close(
        outputs[keys.ENERGY], outputs[keys.ENERGIES].sum().reshape(1)
    )


def test_features_live_in_their_species_block(model):
    graph = graph_of(model, bulk())
    features = model(graph, False, False)[keys.LAST_LAYER_FEATURES]
    width = model.architecture.features_per_species
    blocks = features.reshape(len(graph.species), 2, width)
    for atom, species in enumerate(graph.species.tolist()):
        assert torch.all(blocks[atom, 1 - species] == 0)
        assert blocks[atom, species].abs().max() > 1e-6


# ------------------------------------------------------------ per-species networks


def test_one_network_per_species():
    model = small_model()
    assert len(model.architecture.network.networks) == 2
    pure_cu = graph_of(model, bulk(("Cu",) * 4))
    mixed = graph_of(model, bulk())
    before_cu = model(pure_cu, False, False)[keys.ENERGY]
    before_mixed = model(mixed, False, False)[keys.ENERGY]
    with torch.no_grad():
        for layer in linear_layers(model.architecture.network.networks[1]):  # Ag
            layer.weight.add_(0.1)
        width = model.architecture.features_per_species
        model.architecture.last_layer.weight[:, width:].mul_(2.0)  # Ag block
    torch.testing.assert_close(
        model(pure_cu, False, False)[keys.ENERGY], before_cu, rtol=0, atol=0
    )
    after_mixed = model(mixed, False, False)[keys.ENERGY]
    assert torch.abs(after_mixed - before_mixed).max() > 1e-4


# ------------------------------------------------------------ power spectrum


def power_spectrum(model, atoms):
    architecture = model.architecture
    graph = graph_of(model, atoms)
    vectors = edge_vectors(graph)
    return architecture._power_spectrum(architecture._density(graph, vectors))


def test_power_spectrum_size(model):
    architecture = model.architecture
    n_per_l = architecture.n_per_l
    assert len(n_per_l) == SMALL_SOAP["max_angular"] + 1
    expected = sum(k * (k + 1) // 2 for k in (2 * n for n in n_per_l))
    assert architecture.soap_size == expected
    spectrum = power_spectrum(model, cluster())
    assert spectrum.shape == (6, expected)
    assert architecture.network.networks[0][0].normalized_shape == (expected,)


def test_power_spectrum_rotation_invariant(model):
    atoms = cluster()
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ random_rotation(seed=5).T
    reference = power_spectrum(model, atoms)
    assert reference.abs().max() > 1e-3
    torch.testing.assert_close(
        power_spectrum(model, rotated), reference, rtol=1e-10, atol=1e-12
    )
    # but not blind to geometry: a different cluster has a different spectrum
    assert (power_spectrum(model, cluster(seed=1)) - reference).abs().max() > 1e-3


def test_power_spectrum_of_a_dimer(model):
    """One Ag neighbor at r: p_l[(a,n),(a',n')] = [a=a'=Ag] f(r)² R_nl R_n'l (2l+1)/4π
    for the Cu atom, upper triangle of the (species, n) pairs, l by l."""
    architecture = model.architecture
    r = 4.7  # inside the switching width of the cutoff
    dimer = ase.Atoms("CuAg", positions=[[0, 0, 0], [0.6 * r, 0.8 * r, 0]])
    spectrum = power_spectrum(model, dimer)[0]
    length = torch.tensor([r], dtype=torch.float64)
    f = 0.5 * (1 + math.cos(math.pi * (r - 4.5) / 0.5))
    expected = []
    for ell, radial in enumerate(architecture.radial(length)):
        n = architecture.n_per_l[ell]
        density = torch.zeros(2 * n, dtype=torch.float64)
        density[n:] = f * radial[0]  # only the Ag (species 1) block
        product = torch.outer(density, density) * (2 * ell + 1) / (4 * math.pi)
        rows, cols = torch.triu_indices(2 * n, 2 * n)
        expected.append(product[rows, cols])
    torch.testing.assert_close(spectrum, torch.cat(expected), rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------ dtypes and seeds


# measured: ~8e-6 without ZBL; ~1.1e-5 with it (its polynomial switch cancels
# terms of order 30 down to 1e-3 near the covalent-radius sum in float32)
@pytest.mark.parametrize("zbl, tolerance", [(False, 2e-5), (True, 5e-5)])
def test_float32_and_float64_agree(zbl, tolerance):
    """Same seed, two dtypes: outputs agree to ~1e-5 of their magnitude."""
    atoms = bulk()
    outputs = {}
    for dtype in ("float32", "float64"):
        model = small_model(model_dtype=dtype, zbl=zbl).eval()
        result = model(graph_of(model, atoms, getattr(torch, dtype)))
        for key in (keys.ENERGY, keys.FORCES, keys.STRESS):
            assert result[key].dtype == getattr(torch, dtype)
        outputs[dtype] = {k: v.detach().double().numpy() for k, v in result.items()}
    for key in (keys.ENERGY, keys.ENERGIES, keys.FORCES, keys.STRESS):
        single, double = outputs["float32"][key], outputs["float64"][key]
        assert np.abs(double).max() > 0
        np.testing.assert_allclose(
            single, double, rtol=0, atol=tolerance * np.abs(double).max()
        )


def parameters_equal(a, b):
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_seed_reproducible_and_leaves_global_rng_alone():
    hypers = {"soap": {"max_angular": 2, "max_radial": 2}}
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first = build_model("soap_bpnn", ["Cu", "Ag"], seed=7, **hypers)
    assert torch.equal(torch.get_rng_state(), state)
    second = build_model("soap_bpnn", ["Cu", "Ag"], seed=7, **hypers)
    other = build_model("soap_bpnn", ["Cu", "Ag"], seed=8, **hypers)
    assert parameters_equal(first, second)
    assert not parameters_equal(first, other)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.get_default_dtype() == torch.float32


def test_unseeded_builds_differ():
    """Without a seed each build draws fresh weights (e.g. for an ensemble)."""
    hypers = {"soap": {"max_angular": 2, "max_radial": 2}}
    first = build_model("soap_bpnn", ["Cu"], **hypers)
    second = build_model("soap_bpnn", ["Cu"], **hypers)
    assert not parameters_equal(first, second)


def test_model_is_deep_copyable(model):
    copied = copy.deepcopy(model)
    graph = graph_of(model, bulk())
    torch.testing.assert_close(
        copied(graph)[keys.FORCES], model(graph)[keys.FORCES], rtol=0, atol=0
    )


# ------------------------------------------------------------ long range

K = 14.399645478425668  # eV·Å/e²
LONG_RANGE = pytest.mark.parametrize("use_ewald", [True, False], ids=["ewald", "pme"])


def long_range_model(use_ewald=False, **long_range):
    """A small Na/Cl model whose untrained latent charges (~0.01 e) are redrawn to
    ~0.2 e, so that the Coulomb term is large enough to test."""
    model = small_model(
        ("Na", "Cl"), long_range={"enable": True, "use_ewald": use_ewald, **long_range}
    )
    weight = model.architecture.charges.weight
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=generator, dtype=weight.dtype))
    return model


def ionic_cell() -> ase.Atoms:
    """Rattled triclinic 8-atom NaCl cell: pairs beyond the 5 Å exclusion interact."""
    atoms = ase.build.bulk("NaCl", "rocksalt", a=5.0) * (2, 2, 1)
    atoms.cell = atoms.cell.array + [[0.3, 0.1, 0.0], [0.0, 0.2, -0.3], [0.1, 0.0, 0.4]]
    atoms.rattle(0.1, seed=5)
    return atoms


def coulomb_off(model):
    """A copy whose readout ignores the Coulomb feature column."""
    off = copy.deepcopy(model)
    with torch.no_grad():
        off.architecture.last_layer.weight[0, -1] = 0.0
    return off


@LONG_RANGE
def test_long_range_hyperparameters_build_the_sums(use_ewald):
    from torchpme import EwaldCalculator, PMECalculator

    model = long_range_model(
        use_ewald, smearing=1.2, kspace_resolution=0.9, interpolation_nodes=4
    )
    architecture = model.architecture
    kspace = architecture.long_range.kspace
    assert isinstance(kspace, EwaldCalculator if use_ewald else PMECalculator)
    assert kspace.potential.exclusion_degree == 1
    degree = long_range_model(use_ewald, exclusion_degree=4).architecture.long_range
    assert degree.kspace.potential.exclusion_degree == 4
    assert float(kspace.potential.smearing) == 1.2
    assert float(kspace.potential.prefactor) == pytest.approx(K, rel=1e-12)
    assert kspace.potential.exclusion_radius == model.cutoff == 5.0
    if use_ewald:
        assert kspace.lr_wavelength == 0.9
    else:
        assert kspace.mesh_spacing == 0.9 and kspace.interpolation_nodes == 4
    width = 2 * architecture.features_per_species
    assert architecture.charges.in_features == width
    assert architecture.last_layer.in_features == width + 1  # + the Coulomb feature
    assert float(architecture.last_layer.weight[0, -1].detach()) == 1.0
    # torch-pme's buffers are hyperparameters, not weights
    assert not [k for k in model.state_dict() if "kspace" in k]


@LONG_RANGE
def test_long_range_energy_is_a_last_layer_feature(use_ewald):
    model = long_range_model(use_ewald)
    graph = graph_of(model, ionic_cell())
    raw, features = model.architecture(graph, edge_vectors(graph))
    weights = model.architecture.last_layer.weight
    torch.testing.assert_close(raw, (features @ weights.T).squeeze(-1))
    coulomb = features[:, -1]
    assert coulomb.abs().max() > 1e-3  # the sum is not trivially zero here
    energy = model(graph, False, False)[keys.ENERGY]
    torch.testing.assert_close(
        energy - coulomb_off(model)(graph, False, False)[keys.ENERGY],
        coulomb.sum().reshape(1),
    )


TRANSFER = pytest.mark.parametrize(
    "transfer", [None, 3.0], ids=["per-structure", "transfers"]
)


@LONG_RANGE
@TRANSFER
def test_long_range_forces_and_stress_finite_differences(use_ewald, transfer):
    """Forces and stress (one backward pass through the charges, the k-space sum and
    the strained cell) against central differences on a triclinic ionic cell; with
    charge transfers (3 Å: Na-Cl neighbors at ~2.5 Å) the charges depend on the
    positions through the switch too, and the exclusion switch is of degree 4."""
    model = long_range_model(
        use_ewald,
        charge_transfer_radius=transfer,
        exclusion_degree=1 if transfer is None else 4,
    )
    atoms = ionic_cell()
    subject = Subject(model)
    outputs = subject(subject.graph(atoms))
    forces = numerical_forces(subject.energy, atoms, h=1e-5)
    np.testing.assert_allclose(outputs[keys.FORCES], forces, atol=1e-6)
    without = Subject(coulomb_off(model))(subject.graph(atoms))
    assert np.abs(outputs[keys.FORCES] - without[keys.FORCES]).max() > 1e-3
    assert np.abs(outputs[keys.STRESS] - without[keys.STRESS]).max() > 1e-5
    stress = numerical_stress(subject.energy, atoms, h=1e-5)
    np.testing.assert_allclose(outputs[keys.STRESS][0], stress, atol=1e-7)


@LONG_RANGE
def test_long_range_model_passes_the_contract(use_ewald):
    """pes_calc.testing's checks, except PME's translation invariance: its mesh
    interpolation moves the energy by ~1e-5 eV (tested below)."""
    subject = Subject(long_range_model(use_ewald))
    for name, check in CHECKS.items():
        if name != "invariances" or use_ewald:
            check(subject)
    atoms = subject.bulk()
    moved = atoms.copy()
    moved.positions += [0.3, -1.7, 2.2]
    # measured: 8.5e-6 eV of 0.14 eV
    assert subject.energy(moved) == pytest.approx(subject.energy(atoms), abs=5e-5)


def test_long_range_charges_are_neutral_per_structure():
    model = long_range_model()
    graphs = [graph_of(model, ionic_cell()), graph_of(model, cluster("NaClNaNaNa"))]
    graph = batch_graphs(graphs)
    charges = model.architecture.latent_charges(graph, edge_vectors(graph))
    sums = torch.zeros(2, dtype=charges.dtype)
    sums = sums.index_add(0, graph.structure_index, charges)
    torch.testing.assert_close(sums, torch.zeros(2, dtype=charges.dtype))
    assert charges.abs().max() > 1e-3


def test_transferred_charges_are_neutral_per_molecule():
    """With a 3 Å transfer radius, two Na-Cl molecules and a Na3Cl cluster 6 Å apart
    in one structure (and a periodic cell in the batch) are each neutral; with the
    default per-structure neutralisation the molecules carry net charges."""
    model = long_range_model(charge_transfer_radius=3.0)
    plain = long_range_model()
    pieces = [
        [[0.0, 0.0, 0.0], [0.0, 0.0, 2.5]],
        [[6.0, 0.0, 0.0], [6.0, 0.0, 2.4], [8.0, 0.0, 0.0], [8.0, 2.0, 0.0]],
    ]
    atoms = ase.Atoms("NaClNaClNaNa", positions=[p for piece in pieces for p in piece])
    graph = batch_graphs([graph_of(model, atoms), graph_of(model, ionic_cell())])
    vectors = edge_vectors(graph)
    q = model.architecture.latent_charges(graph, vectors)
    assert float(q[:2].sum()) == pytest.approx(0.0, abs=1e-12)
    assert float(q[2:6].sum()) == pytest.approx(0.0, abs=1e-12)
    assert float(q[6:].sum()) == pytest.approx(0.0, abs=1e-12)
    assert float(q.abs().max()) > 1e-2
    per_structure = plain.architecture.latent_charges(graph, vectors)
    assert abs(float(per_structure[:2].sum())) > 1e-3


def test_transferred_charges_give_a_dipolar_tail():
    """NaCl and Na2Cl2 (different molecules, so per-structure neutralisation would
    leave them opposite net charges and a 1/r tail): with transfers the interaction
    beyond the cutoff falls as r⁻³, and it is the Coulomb energy of the charges."""
    model = long_range_model(charge_transfer_radius=3.0)
    first = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 2.5]])
    second = np.array(
        [[0.0, 0.0, 0.0], [0.0, 0.0, 2.5], [0.0, 2.6, 0.3], [0.0, 2.6, 2.7]]
    )

    def energy(atoms):
        return float(model(graph_of(model, atoms), False, False)[keys.ENERGY])

    a, b = ase.Atoms("NaCl", positions=first), ase.Atoms("NaClNaCl", positions=second)
    charges = []
    for m in (a, b):
        graph = graph_of(model, m)
        q = model.architecture.latent_charges(graph, edge_vectors(graph))
        charges.append(q.detach().numpy())
        assert float(q.sum()) == pytest.approx(0.0, abs=1e-12)
    interactions = []
    for r in (12.0, 40.0, 80.0):
        positions = np.concatenate([first, second + [r, 0.0, 0.0]])
        pair = ase.Atoms("NaClNaClNaCl", positions=positions)
        interaction = energy(pair) - energy(a) - energy(b)
        distances = np.linalg.norm(positions[:2, None] - positions[None, 2:], axis=-1)
        coulomb = K * charges[0][:, None] * charges[1][None, :] / distances
        assert interaction == pytest.approx(np.sum(coulomb), rel=1e-6)
        interactions.append(interaction)
    assert abs(interactions[0]) > 1e-5
    assert interactions[1] / interactions[2] == pytest.approx(8.0, rel=0.05)


def test_long_range_energy_decays_as_coulomb_beyond_the_cutoff():
    """Two Na-Cl molecules r > 5 Å apart: their environments and charges do not change
    with r, so the energy above two lone molecules is the Coulomb energy of the
    charges across, Σ_ij k q_i q_j erf(r_ij/√2σ)/r_ij: a dipole-dipole 1/r³ decay."""
    model = long_range_model()
    molecule = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 2.5]])

    def energy(atoms):
        return float(model(graph_of(model, atoms), False, False)[keys.ENERGY])

    lone = ase.Atoms("NaCl", positions=molecule)
    graph = graph_of(model, lone)
    q = model.architecture.latent_charges(graph, edge_vectors(graph)).detach().numpy()
    assert q[0] == pytest.approx(-q[1]) and abs(q[0]) > 0.05
    interactions = []
    for r in (6.0, 8.0, 12.0, 24.0):
        positions = np.concatenate([molecule, molecule + [r, 0.0, 0.0]])
        pair = ase.Atoms("NaClNaCl", positions=positions)
        interaction = energy(pair) - 2 * energy(lone)
        distances = np.linalg.norm(positions[:2, None] - positions[None, 2:], axis=-1)
        coulomb = K * q[:, None] * q[None, :] * erf_(distances / (1.4 * math.sqrt(2)))
        assert interaction == pytest.approx(np.sum(coulomb / distances), rel=1e-8)
        interactions.append(interaction)
    # parallel dipoles side by side repel, and the interaction falls as r⁻³
    assert interactions[0] > 0
    assert interactions[2] / interactions[3] == pytest.approx(8.0, rel=0.05)


def erf_(x):
    return np.vectorize(math.erf)(x)


@LONG_RANGE
@TRANSFER
def test_long_range_safetensors_and_torchscript_round_trips(
    use_ewald, transfer, tmp_path
):
    from pes_calc.artefacts import load_artefact
    from pes_calc.compile import compile_model

    model = long_range_model(use_ewald, charge_transfer_radius=transfer)
    graph = batch_graphs(
        [graph_of(model, ionic_cell()), graph_of(model, cluster("NaClNaNaClCl"))]
    )
    eager = model(graph)  # a forward with gradients first: the copies must survive it
    save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors").to(torch.float64)
    compile_model(model, tmp_path / "m.pt")
    scripted, _ = load_artefact(tmp_path / "m.pt")
    for other in (loaded(graph), scripted(graph, True, True)):
        for key in (keys.ENERGY, keys.ENERGIES, keys.FORCES, keys.STRESS):
            torch.testing.assert_close(other[key], eager[key], rtol=1e-10, atol=1e-12)


def test_long_range_compiles_from_the_command_line(tmp_path):
    from click.testing import CliRunner

    from pes_calc.cli import main

    save_model(long_range_model(), tmp_path / "m.safetensors")
    result = CliRunner().invoke(
        main, ["compile", str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "m.pt")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.pt").stat().st_size > 0


# ------------------------------------------------------------ neighbour slots


def edge_sum_density(architecture, graph, vectors):
    """The densities as the plain sum over edges: Σ_j [t(j) = a] R_ln Y_lm."""
    i, j = graph.edge_index
    lengths = torch.linalg.vector_norm(vectors, dim=-1)
    radial = architecture._radial(lengths)
    harmonics = architecture.angular.sph.compute(vectors)
    num_atoms, num_species = graph.positions.shape[0], architecture.num_species
    densities, start = [], 0
    for degree, n in enumerate(architecture.n_per_l):
        y = harmonics[:, degree**2 : (degree + 1) ** 2]
        r = radial[:, start : start + n]
        start += n
        block = torch.zeros(
            num_atoms, 2 * degree + 1, num_species, n, dtype=vectors.dtype
        )
        per_edge = y[:, :, None, None] * r[:, None, None, :]
        species = torch.nn.functional.one_hot(graph.species[j], num_species)
        per_edge = per_edge * species[:, None, :, None]
        block = block.index_add(0, i, per_edge)
        densities.append(block.reshape(num_atoms, 2 * degree + 1, -1))
    return densities


def test_slot_densities_equal_the_sum_over_edges(model):
    # a cluster with an isolated atom (no edges) and uneven neighbour counts
    atoms = cluster("CuAgCuCuAgCuAg")
    atoms.positions[-1] = [30.0, 30.0, 30.0]
    graph = graph_of(model, atoms)
    # edges in a shuffled order: the slots must not rely on sorted centres
    order = torch.randperm(
        graph.edge_index.shape[1], generator=torch.Generator().manual_seed(0)
    )
    graph = graph._replace(
        edge_index=graph.edge_index[:, order],
        edge_cell_shifts=graph.edge_cell_shifts[order],
    )
    vectors = edge_vectors(graph)
    architecture = model.architecture
    for ours, reference in zip(
        architecture._density(graph, vectors),
        edge_sum_density(architecture, graph, vectors),
        strict=True,
    ):
        assert torch.allclose(ours, reference, atol=1e-13, rtol=0)
    assert architecture._density(graph, vectors)[0][-1].abs().max() == 0.0


def test_degree_groups_cover_every_degree_once():
    from pes_calc.architectures.soap_bpnn import degree_groups

    for n_per_l in ([8, 7, 7, 6, 6, 5, 5], [4, 4, 4, 4], [3]):
        groups = degree_groups(n_per_l)
        assert groups[0][0] == 0 and groups[-1][1] == len(n_per_l)
        assert all(a[1] == b[0] for a, b in zip(groups, groups[1:], strict=False))
    # metatrain's default basis: two products instead of one (2156 pairs) or seven
    assert degree_groups([8, 7, 7, 6, 6, 5, 5]) == [(0, 4), (4, 7)]


@pytest.mark.parametrize("periodic", [True, False])
def test_export_formulation_gives_the_same_numbers(periodic):
    model = small_model()
    atoms = bulk().repeat((2, 1, 1)) if periodic else cluster()
    graph = graph_of(model, atoms)
    exact = model(graph)
    prepared = copy.deepcopy(model)
    prepared.architecture.prepare_for_export()
    assert prepared.architecture.export_formulation
    first = prepared(graph)
    for name in (keys.ENERGY, keys.FORCES, keys.STRESS):
        assert torch.allclose(first[name], exact[name], atol=1e-13, rtol=0), name
