"""Allegro: nequip-allegro's hyperparameters and defaults, the last-layer features,
the Bessel and spline two-body embeddings, channel coupling of the tensor products,
equivariance of the tensor track, its size at initialisation, per-type scales and
shifts, energy-only models, per-edge-type cutoffs, neighbor normalisation and the
ZBL pair potential.

The shared physics contract (finite differences, invariances of energy and forces,
extensivity, batching, isolated atoms, smooth cutoff) runs in tests/test_contract.py.
"""

from __future__ import annotations

import ase
import ase.build
import numpy as np
import pytest
import torch
from e3nn import o3
from e3nn.util.test import assert_equivariant
from helpers import bulk, run
from torch import Tensor

from pes_calc import build_model, keys
from pes_calc.architectures.allegro import (
    DEFAULT_HYPERS,
    RADIAL_EMBEDS,
    SplineEmbedding,
    irrep_index,
    weighted_harmonics,
)
from pes_calc.artefacts import read_artefact_metadata
from pes_calc.compile import compile_model
from pes_calc.graph import edge_vectors, with_positions_and_cell
from pes_calc.neighbors import atoms_to_graph
from pes_calc.nn.cutoffs import polynomial_envelope
from pes_calc.testing import Subject, numerical_forces, random_rotation

SMALL = {
    "r_max": 4.0,
    "num_scalar_features": 16,
    "num_tensor_features": 4,
    "seed": 0,
    "model_dtype": "float64",
}
SHIFTS = [-3.5, -1.25]
SPLINE = {"name": "TwoBodySplineScalarEmbed", "num_splines": 6, "spline_span": 4}


# the model's tensor track is channel-major; e3nn's modules use their own layout
def to_irreps_layout(x: Tensor, irreps: o3.Irreps) -> Tensor:
    """Channel-major (E, C, Σ 2l+1) → e3nn's layout (E, C×ir₀ + C×ir₁ + ...)."""
    blocks = x.split([ir.dim for _, ir in irreps], dim=-1)
    return torch.cat([block.flatten(1) for block in blocks], dim=1)


def from_irreps_layout(x: Tensor, irreps: o3.Irreps) -> Tensor:
    """e3nn's layout (E, C×ir₀ + C×ir₁ + ...) → channel-major (E, C, Σ 2l+1)."""
    blocks = x.split([mul * ir.dim for mul, ir in irreps], dim=-1)
    return torch.cat(
        [
            b.reshape(len(x), mul, ir.dim)
            for b, (mul, ir) in zip(blocks, irreps, strict=True)
        ],
        dim=-1,
    )


def small_model(species=("Cu", "Ag"), **hypers):
    return build_model("allegro", list(species), **{**SMALL, **hypers})


def cluster() -> ase.Atoms:
    """A rattled fcc fragment: every pair within 4 Å."""
    atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.pbc = False
    atoms.set_chemical_symbols(["Cu", "Ag", "Cu", "Ag"])
    atoms.rattle(0.2, seed=5)
    return atoms


def dimer(a: str, b: str, distance: float) -> ase.Atoms:
    return ase.Atoms([a, b], positions=[[0.0, 0.0, 0.0], [distance, 0.0, 0.0]])


def hidden_widths(mlp):
    linears = [m for m in mlp if isinstance(m, torch.nn.Linear)]
    return [m.out_features for m in linears]


# ------------------------------------------------------------ hyperparameters


def test_default_hypers_are_nequip_allegros():
    expected = {
        "num_layers": 2,
        "num_scalar_features": 64,
        "num_tensor_features": 16,
        "allegro_mlp_hidden_layers_depth": 1,
        "allegro_mlp_hidden_layers_width": 64,
        "readout_mlp_hidden_layers_depth": 1,
        "readout_mlp_hidden_layers_width": 32,
        "tp_path_channel_coupling": True,
    }
    assert {key: DEFAULT_HYPERS[key] for key in expected} == expected
    assert DEFAULT_HYPERS["radial_chemical_embed"] is None
    assert RADIAL_EMBEDS["TwoBodyBesselScalarEmbed"]["num_bessels"] == 8
    assert RADIAL_EMBEDS["TwoBodyBesselScalarEmbed"]["bessel_trainable"] is False
    assert RADIAL_EMBEDS["TwoBodyBesselScalarEmbed"]["polynomial_cutoff_p"] == 6


def test_default_build_follows_the_defaults():
    model = build_model("allegro", ["Cu"], seed=0)
    architecture = model.architecture
    assert model.cutoff == architecture.cutoff == 5.0
    assert len(architecture.tensor_products) == len(architecture.latent_mlps) == 2
    # 16 channels of each irrep of the l_max = 2 spherical harmonics
    first = architecture.tensor_products[0].tensor_product
    assert first.irreps_in2 == o3.Irreps("16x0e+16x1o+16x2e")
    assert architecture.tensor_products[-1].tensor_product.irreps_out == o3.Irreps(
        "16x0e"
    )
    # latent MLPs: one hidden layer of 64, outputs of 64 scalars (+ environment
    # weights for the next layer)
    assert [hidden_widths(mlp)[:-1] for mlp in architecture.latent_mlps] == [[64], [64]]
    assert hidden_widths(architecture.latent_mlps[-1])[-1] == 64
    # readout: one hidden layer of 32, then the bias-free last layer
    assert hidden_widths(architecture.readout_hidden) == [32]
    assert architecture.last_layer.in_features == 32
    assert architecture.last_layer.bias is None
    # coupled path-channel weights: one per path and channel
    assert first.internal_weights and first.weight_numel == 16 * len(first.instructions)
    outputs = run(model, bulk(["Cu"] * 4))
    assert np.isfinite(outputs[keys.ENERGY]).all()
    assert outputs[keys.FORCES].shape == (4, 3)
    assert outputs[keys.LAST_LAYER_FEATURES].shape == (4, 32)


def test_call_from_the_issue():
    model = build_model(
        "allegro",
        ["C", "H", "O"],
        r_max=5.0,
        l_max=2,
        num_layers=2,
        num_scalar_features=64,
        num_tensor_features=16,
    )
    assert model.species == ["C", "H", "O"] and model.cutoff == 5.0
    atoms = ase.Atoms(
        "COHH", positions=[[0, 0, 0], [1.2, 0, 0], [-0.6, 0.9, 0], [-0.6, -0.9, 0.1]]
    )
    outputs = run(model, atoms)
    assert outputs[keys.ENERGY].shape == (1,)
    assert np.isfinite(outputs[keys.ENERGY]).all()
    assert outputs[keys.FORCES].shape == (4, 3)
    assert np.isfinite(outputs[keys.FORCES]).all()


def test_unknown_hyperparameter_is_an_error():
    with pytest.raises(ValueError, match="num_scalar_feature"):
        build_model("allegro", ["Cu"], num_scalar_feature=8)
    with pytest.raises(ValueError, match="num_layers"):
        small_model(num_layers=0)


# ----------------------------------------------------------- last-layer features


@pytest.mark.parametrize("readout_depth", [0, 1])
def test_energies_are_the_last_layer_of_the_features(readout_depth):
    model = small_model(
        per_type_energy_shifts=SHIFTS,
        per_type_energy_scales=[2.0, 0.5],
        readout_mlp_hidden_layers_depth=readout_depth,
    )
    atoms = bulk()
    graph = atoms_to_graph(atoms, model.species, model.cutoff)
    raw, features = model.architecture(graph, edge_vectors(graph))
    # without a hidden readout layer the features are the (num_layers + 1) scalar
    # latents of every edge, summed over each centre's edges
    width = 32 if readout_depth else 16 * 3
    assert features.shape == (4, width)
    torch.testing.assert_close(
        raw, model.architecture.last_layer(features).squeeze(-1), rtol=0, atol=0
    )
    assert raw.abs().min() > 1e-6
    outputs = run(model, atoms)
    np.testing.assert_array_equal(
        outputs[keys.LAST_LAYER_FEATURES], features.detach().numpy()
    )
    np.testing.assert_allclose(
        outputs[keys.ENERGIES],
        raw.detach().numpy() * np.array([2.0, 0.5, 2.0, 0.5]) + np.array(SHIFTS * 2),
        rtol=1e-14,
        atol=1e-14,
    )


@pytest.mark.parametrize("l_max", [1, 2, 3])
def test_last_layer_features_are_invariant(l_max):
    model = small_model(l_max=l_max)
    atoms = bulk()
    reference = run(model, atoms)[keys.LAST_LAYER_FEATURES]
    assert np.abs(reference).max() > 1e-3
    rotation = random_rotation(seed=11)
    for transform in (rotation.T, -np.eye(3)):  # a rotation, the inversion
        moved = atoms.copy()
        moved.positions = atoms.positions @ transform
        moved.cell = atoms.cell.array @ transform
        np.testing.assert_allclose(
            run(model, moved)[keys.LAST_LAYER_FEATURES], reference, rtol=0, atol=1e-10
        )


# ------------------------------------------------------ equivariant tensor track


@pytest.mark.parametrize(
    "l_max, parity, coupling", [(1, True, True), (2, True, False), (3, False, True)]
)
def test_tensor_track_is_equivariant(l_max, parity, coupling):
    torch.manual_seed(0)  # e3nn draws its rotations from the global generator
    model = small_model(
        l_max=l_max, parity=parity, num_layers=3, tp_path_channel_coupling=coupling
    )
    architecture = model.architecture
    graph = atoms_to_graph(cluster(), model.species, model.cutoff)
    captured = []
    for tensor_product in architecture.tensor_products:
        tensor_product.register_forward_hook(  # the track is channel-major
            lambda m, inputs, output: captured.append(
                to_irreps_layout(output, m.tensor_product.irreps_out)
            )
        )

    def features(positions):
        captured.clear()
        moved = with_positions_and_cell(graph, positions, graph.cell)
        _, last = architecture(moved, edge_vectors(moved))
        return (*captured, last)

    irreps_out = [tp.tensor_product.irreps_out for tp in architecture.tensor_products]
    assert irreps_out[0].lmax == l_max and irreps_out[-1] == o3.Irreps("4x0e")
    if (
        parity
    ):  # the first layer's output carries both parities of l = 1 (1e from 1o ⊗ 1o)
        assert {ir.p for _, ir in irreps_out[0] if ir.l == 1} == {1, -1}
    irreps_out.append(o3.Irreps(f"{architecture.last_layer.in_features}x0e"))
    # the outputs' sizes differ by layer and structure: compare each output in units
    # of its own size (a constant keeps equivariance)
    scales = [output.abs().max() for output in features(graph.positions)]
    assert all(scale > 1e-12 for scale in scales)

    def normalised(positions):
        return tuple(
            output / scale
            for output, scale in zip(features(positions), scales, strict=True)
        )

    # e3nn's Wigner D matrices from a rotation matrix are good to ~1e-7 in float64
    # (~1e-6 for l = 3); an error in the model would be O(1)
    errors = assert_equivariant(
        normalised,
        args_in=[graph.positions],
        irreps_in=["cartesian_points"],
        irreps_out=irreps_out,
        tolerance=1e-5,
    )
    for error in errors.values():  # the invariant outputs are exact
        assert float(error[-1]) < 1e-12 and float(error[-2]) < 1e-12


def test_float64_model_is_equivariant_to_float64_precision():
    """The norms of every irrep of the tensor track are exactly invariant in a float64
    model (e3nn's coupling coefficients computed in float64, not converted from
    float32, which leaves errors of ~1e-8)."""
    model = small_model(l_max=3, parity=False, num_layers=3)
    architecture = model.architecture
    captured = []
    for tensor_product in architecture.tensor_products:
        tensor_product.register_forward_hook(  # the track is channel-major
            lambda m, inputs, output: captured.append(
                to_irreps_layout(output, m.tensor_product.irreps_out)
            )
        )
    graph = atoms_to_graph(cluster(), model.species, model.cutoff)

    def norms(transform):
        captured.clear()
        moved = with_positions_and_cell(
            graph, graph.positions @ transform.T, graph.cell
        )
        architecture(moved, edge_vectors(moved))
        out = []
        tensor_products = architecture.tensor_products
        for x, tensor_product in zip(captured, tensor_products, strict=True):
            irreps = tensor_product.tensor_product.irreps_out
            out += [
                x[:, s].reshape(len(x), mul, ir.dim).norm(dim=-1)
                for (mul, ir), s in zip(irreps, irreps.slices(), strict=True)
            ]
        return out

    reference = norms(torch.eye(3, dtype=torch.float64))
    rotation = torch.tensor(random_rotation(seed=5))
    for transform in (rotation, -rotation):
        for expected, actual in zip(reference, norms(transform), strict=True):
            scale = expected.abs().max()
            assert scale > 1e-14
            assert (actual - expected).abs().max() < 1e-12 * scale


@pytest.mark.parametrize("coupling", [True, False])
def test_channel_tensor_product_is_equivariant(coupling):
    torch.manual_seed(0)
    model = small_model(l_max=2, tp_path_channel_coupling=coupling)
    channel_tensor_product = model.architecture.tensor_products[0]
    irreps = channel_tensor_product.tensor_product
    x = irreps.irreps_in1.randn(7, -1, dtype=torch.float64)
    y = irreps.irreps_in2.randn(7, -1, dtype=torch.float64)

    def tensor_product(x, y):  # each row of x with its own environment row of y
        out = channel_tensor_product(
            from_irreps_layout(x, irreps.irreps_in1),
            from_irreps_layout(y, irreps.irreps_in2),
            torch.arange(len(x)),
        )
        return to_irreps_layout(out, irreps.irreps_out)

    scale = float(tensor_product(x, y).abs().max())
    assert scale > 1e-3
    # the same numbers as e3nn's forward, which holds (or is given) the weights
    weight = channel_tensor_product.path_weights.repeat_interleave(4)
    expected = irreps(x, y) if coupling else irreps(x, y, weight)
    torch.testing.assert_close(
        tensor_product(x, y), expected, rtol=0, atol=1e-12 * scale
    )
    # e3nn's Wigner D matrices are good to ~1e-7 (relative) in float64
    assert_equivariant(
        tensor_product,
        args_in=[x, y],
        irreps_in=[irreps.irreps_in1, irreps.irreps_in2],
        irreps_out=[irreps.irreps_out],
        tolerance=1e-6 * scale,
    )


def test_weighted_harmonics_layout_is_channel_major():
    """Channel c of irrep l is weight[c, l] × Y_l: (E, C, Σ 2l+1), which is
    C×0e + C×1o + … once converted to e3nn's layout."""
    torch.manual_seed(0)
    irreps_sh = o3.Irreps.spherical_harmonics(2, p=-1)
    weights = torch.randn(5, 3, 3, dtype=torch.float64)
    vectors = torch.randn(5, 3, dtype=torch.float64)
    harmonics = o3.spherical_harmonics(irreps_sh, vectors, normalize=True)
    out = weighted_harmonics(weights, harmonics, irrep_index(irreps_sh))
    assert out.shape == (5, 3, irreps_sh.dim)
    for degree in range(3):
        rows = slice(degree**2, (degree + 1) ** 2)
        expected = weights[:, :, degree, None] * harmonics[:, rows][:, None]
        torch.testing.assert_close(out[:, :, rows], expected, rtol=0, atol=0)
    irreps_out = o3.Irreps("3x0e+3x1o+3x2e")
    assert torch.equal(
        from_irreps_layout(to_irreps_layout(out, irreps_out), irreps_out), out
    )
    assert_equivariant(
        lambda v: to_irreps_layout(
            weighted_harmonics(
                weights,
                o3.spherical_harmonics(irreps_sh, v, normalize=True),
                irrep_index(irreps_sh),
            ),
            irreps_out,
        ),
        args_in=[vectors],
        irreps_in=[o3.Irreps("1o")],
        irreps_out=[irreps_out],
        tolerance=1e-6,
    )


def test_path_channel_coupling_adds_weights_per_channel():
    coupled = small_model(l_max=2)
    uncoupled = small_model(l_max=2, tp_path_channel_coupling=False)
    paths = [
        len(tp.tensor_product.instructions)
        for tp in coupled.architecture.tensor_products
    ]
    assert paths == [
        len(tp.tensor_product.instructions)
        for tp in uncoupled.architecture.tensor_products
    ]
    assert all(p > 0 for p in paths)

    def count(model):
        return sum(p.numel() for p in model.parameters())

    # one weight per path and channel (4 channels) against one per path
    assert count(coupled) - count(uncoupled) == sum(paths) * (4 - 1)
    assert count(uncoupled) < count(coupled)
    for model in (coupled, uncoupled):
        assert np.isfinite(run(model, bulk())[keys.ENERGY]).all()


# ------------------------------------------------------------ initialisation


def copper_cell() -> ase.Atoms:
    """A rattled 32-atom fcc Cu cell (a = 3.61 Å): 42-43 neighbors within 5 Å."""
    atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=0)
    return atoms


def rms(x: torch.Tensor) -> float:
    return float(x.detach().pow(2).mean().sqrt())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_untrained_tensor_track_neither_collapses_nor_runs_away(seed):
    """Variance-preserving initialisation, with the Bessel projection started as on
    nequip-allegro's basis (`RADIAL_INPUT_SCALE`), keeps the untrained tensor track
    and scalar latents below 1 and shrinking at most ~10× per layer (RMS ~0.1, 0.02,
    3e-3, 4e-4 here). PyTorch's default init shrank the track ~100× per layer (RMS
    ~5e-3, 8e-5, 8e-7, 7e-9); unit-scale Bessel weights put it at the edge of a
    runaway: for other draws of the same init, RMS 2, 5, 27, 1400 and forces of
    ~20 eV/Å on this cell."""
    model = build_model(
        "allegro",
        ["Cu"],
        num_layers=3,
        avg_num_neighbors=42.0,
        seed=seed,
        model_dtype="float64",
    )
    architecture = model.architecture
    track, latents = [], []

    def record_tensors(module, inputs, output):
        if not track:
            track.append(rms(inputs[0]))  # the two-body tensor embedding
        track.append(rms(output))

    def record_latents(module, inputs, output):
        latents.append(rms(output[:, : architecture.num_scalar_features]))

    for tensor_product in architecture.tensor_products:
        tensor_product.register_forward_hook(record_tensors)
    for latent_mlp in architecture.latent_mlps:
        latent_mlp.register_forward_hook(record_latents)
    graph = atoms_to_graph(copper_cell(), model.species, model.cutoff)
    architecture(graph, edge_vectors(graph))
    assert len(track) == 4 and len(latents) == 3
    assert all(
        after / before > 3e-2 for before, after in zip(track, track[1:], strict=False)
    ), track
    assert all(size < 1.0 for size in track), track
    assert all(0.03 < size < 1.0 for size in latents), latents


# ---------------------------------------------------------- two-body embeddings


def test_bessel_and_spline_embeddings():
    bessel = small_model()
    spline = small_model(radial_chemical_embed=SPLINE)
    assert type(bessel.architecture.radial_embedding).__name__ == "BesselEmbedding"
    embedding = spline.architecture.radial_embedding
    assert isinstance(embedding, SplineEmbedding)
    assert (embedding.num_splines, embedding.degree) == (6, 3)
    # the spline embedding feeds the scalar embedding directly, without a two-body MLP
    assert len(spline.architecture.two_body_mlp) == 0
    assert embedding.coefficients.weight.shape == (4, 6 * 16)
    atoms = bulk()
    energies = [run(model, atoms) for model in (bessel, spline)]
    for outputs in energies:
        assert np.isfinite(outputs[keys.ENERGY]).all()
        assert np.isfinite(outputs[keys.FORCES]).all()
    assert abs(energies[0][keys.ENERGY][0] - energies[1][keys.ENERGY][0]) > 1e-6
    # the Bessel embedding's own options reach it
    custom = small_model(
        radial_chemical_embed={"num_bessels": 5, "two_body_embedding_dim": 7}
    )
    assert custom.architecture.radial_embedding.bessel.frequencies.shape == (5,)
    assert custom.architecture.radial_embedding.out_features == 7


@pytest.mark.parametrize(
    "embed, message",
    [
        ({"name": "TwoBodyGaussianScalarEmbed"}, "TwoBodyGaussianScalarEmbed"),
        ({"num_bessel": 8}, "num_bessel"),
        ({"name": "TwoBodySplineScalarEmbed", "num_bessels": 8}, "num_bessels"),
        ({"name": "TwoBodySplineScalarEmbed", "num_splines": 1}, "num_splines"),
        ({"name": "TwoBodySplineScalarEmbed", "spline_span": 1}, "spline_span"),
    ],
)
def test_invalid_radial_chemical_embed(embed, message):
    with pytest.raises(ValueError, match=message):
        small_model(radial_chemical_embed=embed)


def spline_embedding(num_splines=8, spline_span=3, out_features=3, dtype=torch.float64):
    torch.manual_seed(0)
    hypers = {
        "num_splines": num_splines,
        "spline_span": spline_span,
        "polynomial_cutoff_p": 6,
    }
    return SplineEmbedding(2, hypers, out_features).to(dtype)


def test_spline_embedding_vanishes_at_the_cutoff():
    embedding = spline_embedding()
    x = torch.tensor([0.5, 0.999999, 1.0, 1.2], dtype=torch.float64, requires_grad=True)
    species_i = torch.tensor([0, 0, 1, 1])
    species_j = torch.tensor([1, 0, 1, 0])
    out = embedding(x, species_i, species_j)
    assert out.shape == (4, 3)
    assert out[0].abs().max() > 1e-3
    assert out[1].abs().max() < 1e-12
    torch.testing.assert_close(
        out[2:], torch.zeros(2, 3, dtype=torch.float64), rtol=0, atol=0
    )
    (gradient,) = torch.autograd.grad(out.sum(), x)
    assert gradient[1].abs() < 1e-9
    assert gradient[2:].abs().max() == 0.0


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("num_splines, spline_span", [(8, 2), (8, 3), (32, 4)])
def test_spline_basis_is_a_partition_of_unity(num_splines, spline_span, dtype, atol):
    embedding = spline_embedding(num_splines, spline_span, out_features=1, dtype=dtype)
    with torch.no_grad():
        embedding.coefficients.weight.fill_(1.0)
    x = torch.linspace(0.3, 0.7, 401, dtype=dtype)
    types = torch.zeros(401, dtype=torch.long)
    total = embedding(x, types, types)[:, 0] / polynomial_envelope(x, 1.0, 6.0)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_spline_basis_has_local_support(dtype):
    """Coefficient k acts only within spline_span / 2 spacings of its centre k/(K-1)."""
    num_splines, spline_span = 32, 4
    embedding = spline_embedding(num_splines, spline_span, out_features=1, dtype=dtype)
    k = 3
    with torch.no_grad():
        embedding.coefficients.weight.zero_()
        embedding.coefficients.weight[0, k] = 1.0
    x = torch.linspace(0.0, 0.999, 1000, dtype=dtype)
    types = torch.zeros(1000, dtype=torch.long)
    out = embedding(x, types, types)[:, 0]
    spacing = 1.0 / (num_splines - 1)
    outside = (x - k * spacing).abs() >= 0.5 * spline_span * spacing
    assert outside.sum() > 800 and (~outside).sum() > 100
    assert out[outside].abs().max() == 0.0
    assert out[~outside].abs().max() > 0.1


def test_spline_coefficients_depend_on_the_type_pair():
    embedding = spline_embedding()
    x = torch.full((4,), 0.4, dtype=torch.float64)
    out = embedding(x, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]))
    assert torch.cdist(out, out).fill_diagonal_(1.0).min() > 1e-3


# ------------------------------------------------------ per-type scales and shifts


def test_shifts_are_the_energies_of_dissociated_atoms():
    model = small_model(per_type_energy_shifts=SHIFTS)
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


def test_scales_multiply_the_raw_energies():
    reference = small_model(per_type_energy_shifts=SHIFTS)
    scaled = small_model(per_type_energy_shifts=SHIFTS, per_type_energy_scales=2.0)
    atoms = bulk()
    shifts = np.array(SHIFTS * 2)
    raw = run(reference, atoms)[keys.ENERGIES] - shifts
    assert np.abs(raw).min() > 1e-6
    np.testing.assert_allclose(
        run(scaled, atoms)[keys.ENERGIES] - shifts, 2.0 * raw, rtol=1e-12, atol=1e-14
    )


# ------------------------------------------------------------ energy-only models


def test_energy_only_model_and_force_modifier(tmp_path):
    # the contract's bulk has 42 neighbors within 4 Å: normalise by about that, as a
    # trained model does (unnormalised, the untrained forces reach 10⁴-10⁵ eV/Å)
    model = small_model(do_derivatives=False, avg_num_neighbors=40.0)
    outputs = run(model, bulk())
    assert set(outputs) == {keys.ENERGY, keys.ENERGIES, keys.LAST_LAYER_FEATURES}
    path = tmp_path / "model.pt"
    compile_model(model, path, modifiers=["enable_ForceStressOutput"])
    assert read_artefact_metadata(path)["modifiers"] == ["enable_ForceStressOutput"]
    subject = Subject(path)
    atoms = subject.bulk()
    forces = subject(subject.graph(atoms))[keys.FORCES]
    assert np.abs(forces).max() > 1e-2
    # the untrained forces are O(10) eV/Å and vary on a 0.1 Å scale in this compressed
    # cell: a short step keeps the central differences' error (∝ h²) below 1e-5
    numerical = numerical_forces(subject.energy, atoms, h=1e-5)
    np.testing.assert_allclose(forces, numerical, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="enable_Everything"):
        compile_model(model, tmp_path / "other.pt", modifiers=["enable_Everything"])


# ------------------------------------------------------- per-edge-type cutoffs


def test_edge_beyond_its_pair_cutoff_contributes_nothing():
    model = small_model(
        per_type_energy_shifts=SHIFTS,
        per_edge_type_cutoff={"Cu": {"Ag": 3.5}, "Ag": {"Cu": 3.5}},
    )
    outputs = run(model, dimer("Cu", "Ag", 3.8))
    np.testing.assert_array_equal(
        outputs[keys.ENERGIES], run(model, dimer("Cu", "Ag", 9.0))[keys.ENERGIES]
    )
    np.testing.assert_array_equal(outputs[keys.ENERGIES], SHIFTS)
    np.testing.assert_array_equal(outputs[keys.FORCES], np.zeros((2, 3)))
    assert np.abs(run(model, dimer("Cu", "Ag", 3.2))[keys.ENERGY] - sum(SHIFTS)) > 1e-6
    assert (
        np.abs(run(model, dimer("Cu", "Cu", 3.8))[keys.ENERGY] - 2 * SHIFTS[0]) > 1e-6
    )


def test_per_edge_type_cutoff_is_directional():
    """Allegro's atom energy sums the edges of its centre only: cutting Cu→Ag leaves
    the Cu atom at its shift and the Ag atom exactly as without any pair cutoff."""
    model = small_model(
        per_type_energy_shifts=SHIFTS, per_edge_type_cutoff={"Cu": {"Ag": 3.5}}
    )
    plain = small_model(per_type_energy_shifts=SHIFTS)
    atoms = dimer("Cu", "Ag", 3.6)
    outputs, reference = run(model, atoms), run(plain, atoms)
    assert outputs[keys.ENERGIES][0] == SHIFTS[0]
    assert abs(reference[keys.ENERGIES][0] - SHIFTS[0]) > 1e-6
    assert abs(outputs[keys.ENERGIES][1] - SHIFTS[1]) > 1e-8  # Ag still sees Cu
    np.testing.assert_allclose(
        outputs[keys.ENERGIES][1], reference[keys.ENERGIES][1], rtol=1e-14, atol=0
    )


@pytest.mark.parametrize(
    "cutoffs", [{"Cu": {"Ag": 4.5}}, {"Ag": 5.0}, {"Zn": 3.0}, {"Cu": {"Zn": 3.0}}]
)
def test_invalid_per_edge_type_cutoff(cutoffs):
    with pytest.raises(ValueError, match="per_edge_type_cutoff"):
        small_model(per_edge_type_cutoff=cutoffs)


# ------------------------------------------------------------ avg_num_neighbors


def test_avg_num_neighbors():
    atoms = bulk()
    plain = run(small_model(), atoms)[keys.ENERGY][0]
    single = run(small_model(avg_num_neighbors=12.0), atoms)[keys.ENERGY][0]
    same = run(small_model(avg_num_neighbors={"Cu": 12.0, "Ag": 12.0}), atoms)[
        keys.ENERGY
    ][0]
    per_type = run(small_model(avg_num_neighbors={"Cu": 10.0, "Ag": 14.0}), atoms)[
        keys.ENERGY
    ][0]
    assert single == same
    assert abs(single - plain) > 1e-6 and abs(per_type - single) > 1e-6
    with pytest.raises(ValueError, match="Ag"):
        small_model(avg_num_neighbors={"Cu": 12.0})


# ---------------------------------------------------------------------- ZBL


def test_zbl_pair_potential():
    close = dimer("Cu", "Cu", 0.5)
    plain = run(small_model(species=["Cu"]), close)[keys.ENERGY][0]
    metal = run(small_model(species=["Cu"], pair_potential="ZBL"), close)[keys.ENERGY][
        0
    ]
    real = small_model(species=["Cu"], pair_potential={"name": "ZBL", "units": "real"})
    assert real.pair_potential.units == "real"
    assert metal - plain > 100.0
    assert run(real, close)[keys.ENERGY][0] - plain > metal - plain
    with pytest.raises(ValueError, match="pair_potential"):
        small_model(species=["Cu"], pair_potential="Buckingham")
