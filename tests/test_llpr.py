"""LLPR (pes_calc.llpr): uncertainties are the standard deviations of the module
docstring's formulas, recomputed here in numpy; the covariance, regulariser,
calibration and ensemble (means, finite-difference forces, spread) on small
models of every architecture; invariances; TorchScript and safetensors artefacts;
float64 state in float32 models; structures without edges.
"""

from __future__ import annotations

import copy
import math
import warnings

import ase
import ase.build
import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from torch import Tensor

import pes_calc.llpr
import pes_calc.train.llpr
import pes_calc.train.llpr_ensemble
from pes_calc import build_model, keys, load_model, save_model
from pes_calc.artefacts import load_artefact
from pes_calc.compile import compile_model
from pes_calc.graph import AtomicGraph, batch_graphs, sum_per_structure
from pes_calc.llpr import LLPR
from pes_calc.neighbors import atoms_to_graph
from pes_calc.testing import numerical_forces, random_rotation
from pes_calc.train.data import LabelKeys, extract_labels, labelled_graphs
from pes_calc.train.llpr import (
    SMALLEST_REGULARIZER,
    calibrate,
    calibrate_forces,
    calibration_factor,
    factorise,
    fit_covariance,
    gaussian_crps,
    raw_energy_errors,
    raw_force_errors,
    sample_ensemble,
    wrap,
)

SPECIES = ["Cu", "Ag"]
SCALES = [1.3, 0.7]  # per-type σ_t ≠ 1, so g_i = σ_t f_i is tested
# tiny models: F = 12 (SOAP-BPNN: 2 species × 6), 6 (NequIP), 6 (Allegro)
HYPERS = {
    "soap_bpnn": {
        "soap": {"max_angular": 2, "max_radial": 2},
        "bpnn": {"num_hidden_layers": 1, "num_neurons_per_layer": 6},
    },
    "nequip": {
        "r_max": 4.0,
        "num_layers": 1,
        "num_features": 6,
        "l_max": 1,
        "avg_num_neighbors": 12.0,
    },
    "allegro": {
        "r_max": 4.0,
        "num_layers": 1,
        "l_max": 1,
        "num_scalar_features": 8,
        "num_tensor_features": 2,
        "two_body_mlp_hidden_layers_width": 8,
        "scalar_embed_mlp_hidden_layers_width": 8,
        "allegro_mlp_hidden_layers_width": 8,
        "readout_mlp_hidden_layers_width": 6,
        "avg_num_neighbors": 12.0,
    },
}
ARCHITECTURES = list(HYPERS)
MEMBERS = 5  # ≤ F for every model: the per-member branch of the ensemble forces


def small_model(name: str, species=SPECIES):
    return build_model(
        name,
        list(species),
        model_dtype="float64",
        seed=0,
        per_type_energy_scales=SCALES[: len(species)],
        **HYPERS[name],
    )


def structure(kind: str, seed: int, species=SPECIES) -> ase.Atoms:
    """Small rattled structures of several sizes and periodicities, random species."""
    rng = np.random.default_rng(seed)
    if kind == "primitive":  # 1 atom, edges only to its periodic images
        atoms = ase.build.bulk("Cu", "fcc", a=3.6)
    elif kind == "bulk":  # 4 atoms, triclinic
        atoms = ase.build.bulk("Cu", "fcc", a=3.7, cubic=True)
        atoms.cell = atoms.cell.array + rng.uniform(-0.2, 0.2, (3, 3))
    elif kind == "supercell":  # 8 atoms
        atoms = ase.build.bulk("Cu", "fcc", a=3.65, cubic=True) * (2, 1, 1)
    elif kind == "cluster":  # 5 atoms, no cell
        atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms = atoms + ase.Atoms("Cu", positions=[[1.8, 1.8, 1.8]])
        atoms.pbc = False
        atoms.cell = np.zeros((3, 3))
    else:
        raise ValueError(kind)
    symbols = rng.choice(list(species), size=len(atoms))
    atoms.set_chemical_symbols(list(symbols))
    atoms.positions += rng.normal(0.0, 0.08, size=atoms.positions.shape)
    return atoms


def training_set(count: int, seed: int, species=SPECIES) -> list[ase.Atoms]:
    kinds = ["primitive", "bulk", "supercell", "cluster"]
    return [structure(kinds[i % 4], seed + i, species) for i in range(count)]


def emt_labelled(structures: list[ase.Atoms]) -> list[ase.Atoms]:
    for atoms in structures:
        atoms.calc = EMT()
        energy = atoms.get_potential_energy()
        atoms.calc = SinglePointCalculator(atoms, energy=energy)
    return structures


def graphs_of(structures, model) -> list[AtomicGraph]:
    """Graphs with their energy labels, if the structures have them."""
    if structures[0].calc is None:
        return [graph_of(atoms, model) for atoms in structures]
    labels = extract_labels(structures, LabelKeys(forces=None, stress=None))
    return labelled_graphs(structures, labels, model.species, model.cutoff)


def graph_of(atoms: ase.Atoms, model) -> AtomicGraph:
    return atoms_to_graph(atoms, model.species, model.cutoff)


def run(model, graph: AtomicGraph, derivatives: bool = True) -> dict[str, np.ndarray]:
    outputs = model(graph, derivatives, derivatives)
    return {k: v.detach().numpy() for k, v in outputs.items()}


_FITTED: dict[str, LLPR] = {}


def fitted(name: str) -> LLPR:
    """A fitted LLPR (12 training structures, EMT-labelled validation set), built
    once per architecture; tests that change it work on a deep copy."""
    if name not in _FITTED:
        model = small_model(name)
        train = graphs_of(training_set(12, seed=0), model)
        val = graphs_of(emt_labelled(training_set(6, seed=100)), model)
        _FITTED[name] = wrap(model, MEMBERS, train, val, batch_size=5, seed=1)
    return _FITTED[name]


def with_members(llpr: LLPR, members: int, seed: int = 0) -> LLPR:
    """The same fitted LLPR with another ensemble size."""
    other = LLPR(copy.deepcopy(llpr.potential), members).eval()
    for name in ("covariance", "inverse_cholesky", "multiplier", "regularizer"):
        getattr(other.state, name).copy_(getattr(llpr.state, name))
    sample_ensemble(other, seed)
    return other


def three_structures() -> list[ase.Atoms]:
    """4, 5 and 8 atoms: triclinic, cluster, supercell."""
    return [structure("bulk", 7), structure("cluster", 8), structure("supercell", 9)]


def numpy_sigmas(llpr: LLPR, outputs: dict, species: np.ndarray, structure_index):
    """(per-atom, per-structure) α √(gᵀ (C + ς² I)⁻¹ g), from the outputs' features
    and the stored covariance and regulariser (not the stored factor)."""
    scales = llpr.potential.per_type_energy_scales.detach().numpy()
    g_atoms = outputs[keys.LAST_LAYER_FEATURES] * scales[species][:, None]
    g_structures = np.zeros((structure_index.max() + 1, g_atoms.shape[1]))
    np.add.at(g_structures, structure_index, g_atoms)
    covariance = llpr.state.covariance.numpy()
    regularizer = float(llpr.state.regularizer)
    regularized = covariance + regularizer**2 * np.eye(len(covariance))
    alpha = float(llpr.state.multiplier)

    def sigma(g):
        return alpha * np.sqrt(
            np.einsum("sf,fs->s", g, np.linalg.solve(regularized, g.T))
        )

    return sigma(g_atoms), sigma(g_structures)


# ---------------------------------------------------------------- uncertainties


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_uncertainties_are_the_formula_standard_deviations(name):
    llpr = fitted(name)
    graph = batch_graphs([graph_of(atoms, llpr) for atoms in three_structures()])
    outputs = run(llpr, graph)
    atom_sigma, structure_sigma = numpy_sigmas(
        llpr, outputs, graph.species.numpy(), graph.structure_index.numpy()
    )
    # L⁻¹ (C + ς²I) L⁻ᵀ = I to FACTOR_TOLERANCE (1e-6; the SOAP-BPNN C is singular
    # and its ς sits at that limit), so σ agrees to F × 1e-6 at worst
    np.testing.assert_allclose(
        outputs[keys.ENERGIES_UNCERTAINTY], atom_sigma, rtol=1e-5
    )
    np.testing.assert_allclose(
        outputs[keys.ENERGY_UNCERTAINTY], structure_sigma, rtol=1e-5
    )
    assert np.all(structure_sigma > 0) and np.all(atom_sigma > 0)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_llpr_features_are_the_energy_gradient_wrt_last_layer(name):
    """g_s = Σ_i σ_t f_i is ∂E_s/∂w: what the covariance formula assumes."""
    llpr = copy.deepcopy(fitted(name))
    weight = llpr.potential.architecture.last_layer.weight
    weight.requires_grad_(True)
    graph = batch_graphs([graph_of(atoms, llpr) for atoms in three_structures()])
    outputs = llpr(graph, False, False)
    features = llpr.llpr_features(outputs[keys.LAST_LAYER_FEATURES], graph.species)
    expected = sum_per_structure(features, graph).detach()
    for s in range(expected.shape[0]):
        (gradient,) = torch.autograd.grad(
            outputs[keys.ENERGY][s], [weight], retain_graph=True
        )
        torch.testing.assert_close(gradient[0], expected[s], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_doubling_the_multiplier_doubles_every_uncertainty(name):
    llpr = copy.deepcopy(fitted(name))
    graph = graph_of(structure("bulk", 7), llpr)
    before = run(llpr, graph)
    llpr.state.multiplier.mul_(2.0)
    after = run(llpr, graph)
    for key in (keys.ENERGY_UNCERTAINTY, keys.ENERGIES_UNCERTAINTY):
        np.testing.assert_allclose(after[key], 2 * before[key], rtol=1e-12)
    sample_ensemble(llpr, seed=1)  # the fixture's seed: same z, twice the spread
    after = run(llpr, graph)
    energy = before[keys.ENERGY][:, None]
    np.testing.assert_allclose(
        after[keys.ENERGY_ENSEMBLE] - energy,
        2 * (before[keys.ENERGY_ENSEMBLE] - energy),
        rtol=1e-9,
        atol=1e-9 * np.abs(before[keys.ENERGY_ENSEMBLE] - energy).max(),
    )
    deviations = before[keys.FORCES_ENSEMBLE] - before[keys.FORCES]
    np.testing.assert_allclose(
        after[keys.FORCES_ENSEMBLE] - after[keys.FORCES],
        2 * deviations,
        rtol=1e-9,
        atol=1e-9 * np.abs(deviations).max(),
    )
    np.testing.assert_allclose(
        after[keys.FORCES_UNCERTAINTY], 2 * before[keys.FORCES_UNCERTAINTY], rtol=1e-9
    )


# ---------------------------------------------------------------- covariance


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_covariance_is_the_sum_of_per_atom_normalised_outer_products(name):
    llpr = LLPR(small_model(name)).eval()
    structures = training_set(5, seed=20)  # 1, 4, 8, 5 and 1 atoms
    graphs = graphs_of(structures, llpr)
    scales = np.array(SCALES)
    expected = np.zeros((llpr.num_features, llpr.num_features))
    for atoms, graph in zip(structures, graphs, strict=True):
        features = run(llpr.potential, graph, False)[keys.LAST_LAYER_FEATURES]
        g = (features * scales[graph.species.numpy()][:, None]).sum(0) / len(atoms)
        expected += np.outer(g, g)
    for batch_size in (1, 2, 8):
        covariance = fit_covariance(llpr, graphs, batch_size=batch_size)
        assert covariance.dtype == torch.float64
        np.testing.assert_allclose(covariance.numpy(), expected, rtol=1e-12, atol=1e-14)
        np.testing.assert_array_equal(llpr.state.covariance.numpy(), covariance.numpy())


# ---------------------------------------------------------------- regulariser


def factorisation_residual(llpr: LLPR, regularizer: float) -> float:
    """max |L⁻¹ (C + ς² I) L⁻ᵀ - I|."""
    inverse = llpr.state.inverse_cholesky.numpy()
    covariance = llpr.state.covariance.numpy()
    regularized = covariance + regularizer**2 * np.eye(len(covariance))
    return float(
        np.abs(inverse @ regularized @ inverse.T - np.eye(len(covariance))).max()
    )


def two_structure_llpr(name: str) -> LLPR:
    """Two training structures for F ≥ 6 features: C has rank 2."""
    llpr = LLPR(small_model(name), MEMBERS).eval()
    covariance = fit_covariance(llpr, graphs_of(training_set(2, seed=30), llpr))
    assert np.linalg.matrix_rank(covariance.numpy()) <= 2 < llpr.num_features
    return llpr


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_rank_deficient_covariance_gets_a_finite_regulariser(name):
    llpr = two_structure_llpr(name)
    regularizer = factorise(llpr, None)
    assert math.isfinite(regularizer) and regularizer > 0
    assert float(llpr.state.regularizer) == regularizer
    assert torch.isfinite(llpr.state.inverse_cholesky).all()
    # the smallest of the ladder 1e-20 · 10^k: one step down fails
    step = round(math.log10(regularizer / SMALLEST_REGULARIZER))
    if step > 0:
        with pytest.raises(ValueError, match="not positive definite"):
            factorise(copy.deepcopy(llpr), SMALLEST_REGULARIZER * 10.0 ** (step - 1))
    sample_ensemble(llpr, seed=0)
    outputs = run(llpr, graph_of(structure("bulk", 31), llpr))
    for key in (
        keys.ENERGY_UNCERTAINTY,
        keys.ENERGIES_UNCERTAINTY,
        keys.ENERGY_ENSEMBLE,
        keys.FORCES_ENSEMBLE,
        keys.FORCES_UNCERTAINTY,
    ):
        assert np.isfinite(outputs[key]).all(), key


def one_species_llpr() -> LLPR:
    """A Cu/Ag SOAP-BPNN fitted on Cu only: the Ag block of C is exactly zero."""
    llpr = LLPR(small_model("soap_bpnn"), MEMBERS).eval()
    fit_covariance(llpr, graphs_of(training_set(12, seed=40, species=["Cu"]), llpr))
    covariance = llpr.state.covariance.numpy()
    assert np.all(covariance[6:] == 0) and np.all(covariance[:, 6:] == 0)
    assert np.abs(covariance[:6, :6]).max() > 0
    return llpr


def test_species_missing_from_training_gets_a_finite_regulariser():
    llpr = one_species_llpr()
    regularizer = factorise(llpr, None)
    assert math.isfinite(regularizer)
    assert torch.isfinite(llpr.state.inverse_cholesky).all()
    sample_ensemble(llpr, seed=0)
    outputs = run(llpr, graph_of(structure("bulk", 41), llpr))  # Cu and Ag atoms
    for key in (
        keys.ENERGY_UNCERTAINTY,
        keys.ENERGIES_UNCERTAINTY,
        keys.ENERGY_ENSEMBLE,
        keys.FORCES_ENSEMBLE,
        keys.FORCES_UNCERTAINTY,
    ):
        assert np.isfinite(outputs[key]).all(), key


TOO_SMALL = "not positive definite .*with regularizer ς = {}; use a larger value"


@pytest.mark.parametrize("too_small", [0.0, 1e-200])  # ς² = 0 in float64 for both
def test_too_small_explicit_regulariser_on_an_exactly_singular_covariance_raises(
    too_small,
):
    llpr = one_species_llpr()
    before = llpr.state.inverse_cholesky.clone()
    with pytest.raises(ValueError, match=TOO_SMALL.format(too_small)):
        factorise(llpr, too_small)
    assert torch.equal(llpr.state.inverse_cholesky, before)  # left untouched


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_too_small_explicit_regulariser_on_a_rank_deficient_covariance_raises(name):
    """ς² far below the rounding level of C: Cholesky fails, or succeeds on
    rounding noise with an L⁻¹ that does not reproduce C + ς²I; both raise."""
    llpr = two_structure_llpr(name)
    for too_small in (0.0, 1e-12):
        with pytest.raises(ValueError, match=TOO_SMALL.format(too_small)):
            factorise(llpr, too_small)
    assert float(llpr.state.regularizer) == 0.0
    assert torch.equal(
        llpr.state.inverse_cholesky, torch.eye(llpr.num_features).double()
    )


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_explicit_regulariser_is_used_as_given(name):
    llpr = copy.deepcopy(fitted(name))
    assert factorise(llpr, 0.3) == 0.3
    assert float(llpr.state.regularizer) == 0.3
    assert factorisation_residual(llpr, 0.3) < 1e-10
    # C alone is not what was factorised
    assert factorisation_residual(llpr, 0.0) > 1e-3
    graph = graph_of(structure("supercell", 50), llpr)
    outputs = run(llpr, graph, derivatives=False)
    atom_sigma, structure_sigma = numpy_sigmas(
        llpr, outputs, graph.species.numpy(), graph.structure_index.numpy()
    )
    np.testing.assert_allclose(
        outputs[keys.ENERGIES_UNCERTAINTY], atom_sigma, rtol=1e-10
    )
    np.testing.assert_allclose(
        outputs[keys.ENERGY_UNCERTAINTY], structure_sigma, rtol=1e-10
    )


# ---------------------------------------------------------------- calibration


def synthetic_errors(a: float, count: int = 100_000, seed: int = 0):
    """Residuals r = a σ z with z ~ N(0, 1) and σ spread over two decades."""
    generator = torch.Generator().manual_seed(seed)
    sigmas = torch.exp(torch.randn(count, generator=generator, dtype=torch.float64))
    z = torch.randn(count, generator=generator, dtype=torch.float64)
    return a * sigmas * z, sigmas


@pytest.mark.parametrize("method", ["squared_residuals", "absolute_residuals", "crps"])
def test_calibration_recovers_the_error_scale(method):
    """α ≈ a within 2 %: over seeds the estimators scatter by 0.25 % (squared and
    absolute residuals) and 0.5 % (CRPS) at 1e5 samples."""
    residuals, sigmas = synthetic_errors(2.5)
    alpha = calibration_factor(residuals, sigmas, method)
    assert alpha == pytest.approx(2.5, rel=0.02)
    # α scales inversely with the uncalibrated σ
    assert calibration_factor(residuals, 4 * sigmas, method) == pytest.approx(
        alpha / 4, rel=1e-6
    )


def test_crps_calibration_minimises_the_crps():
    residuals, sigmas = synthetic_errors(0.7, count=20_000, seed=1)
    alpha = calibration_factor(residuals, sigmas, "crps")
    best = float(gaussian_crps(residuals, alpha * sigmas))
    for factor in (1 - 1e-3, 1 + 1e-3):
        assert best < float(gaussian_crps(residuals, alpha * factor * sigmas))
    # and it differs from the other estimators on the same data
    assert alpha != calibration_factor(residuals, sigmas, "squared_residuals")


def test_unknown_calibration_method_raises():
    residuals, sigmas = synthetic_errors(1.0, count=10)
    with pytest.raises(ValueError, match="unknown calibration_method 'nll'"):
        calibration_factor(residuals, sigmas, "nll")


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_calibrate_uses_the_inference_sigmas_and_stores_alpha(name):
    llpr = copy.deepcopy(fitted(name))
    structures = emt_labelled(training_set(4, seed=60))
    graphs = graphs_of(structures, llpr)
    residuals, sigmas = raw_energy_errors(llpr, graphs, batch_size=3)
    alpha_before = float(llpr.state.multiplier)
    for atoms, graph, residual, sigma in zip(
        structures, graphs, residuals, sigmas, strict=True
    ):
        outputs = run(llpr, graph, derivatives=False)
        expected_residual = outputs[keys.ENERGY][0] - atoms.get_potential_energy()
        assert float(residual) == pytest.approx(expected_residual, rel=1e-12, abs=1e-12)
        assert float(sigma) * alpha_before == pytest.approx(
            outputs[keys.ENERGY_UNCERTAINTY][0], rel=1e-10
        )
    alpha = calibrate(llpr, graphs, "squared_residuals", batch_size=3)
    assert alpha == pytest.approx(
        math.sqrt(float(torch.mean((residuals / sigmas) ** 2)))
    )
    assert float(llpr.state.multiplier) == alpha


def test_wrap_records_its_settings():
    llpr = fitted("nequip")
    assert llpr.config["llpr"] == {
        "num_ensemble_members": {"energy": MEMBERS},
        "regularizer": float(llpr.state.regularizer),
        "calibration_method": "absolute_residuals",
        "multiplier": float(llpr.state.multiplier),
    }
    assert float(llpr.state.multiplier) > 0


# ------------------------------------------------ per-property calibration


def force_labelled(structures: list[ase.Atoms]) -> list[ase.Atoms]:
    """EMT energies and forces as single-point labels."""
    for atoms in structures:
        atoms.calc = EMT()
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    return structures


def force_graphs(structures, model) -> list[AtomicGraph]:
    labels = extract_labels(structures, LabelKeys(stress=None))
    return labelled_graphs(structures, labels, model.species, model.cutoff)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_force_scale_scales_force_uncertainties_only(name):
    llpr = copy.deepcopy(fitted(name))
    graph = graph_of(structure("bulk", 7), llpr)
    before = run(llpr, graph)
    llpr.state.force_scale.fill_(3.0)
    after = run(llpr, graph)
    for key in (keys.ENERGY_UNCERTAINTY, keys.ENERGIES_UNCERTAINTY):
        np.testing.assert_array_equal(after[key], before[key])
    np.testing.assert_array_equal(
        after[keys.ENERGY_ENSEMBLE], before[keys.ENERGY_ENSEMBLE]
    )
    np.testing.assert_allclose(
        after[keys.FORCES_UNCERTAINTY], 3 * before[keys.FORCES_UNCERTAINTY], rtol=1e-12
    )
    np.testing.assert_allclose(
        after[keys.FORCES_ENSEMBLE] - after[keys.FORCES],
        3 * (before[keys.FORCES_ENSEMBLE] - before[keys.FORCES]),
        rtol=1e-9,
        atol=1e-12,
    )
    np.testing.assert_array_equal(after[keys.FORCES], before[keys.FORCES])


@pytest.mark.parametrize("method", ["squared_residuals", "absolute_residuals"])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_force_calibration_fits_the_validation_forces(name, method):
    """After calibrate_forces, the runtime σ_F meet the method's condition on the
    validation force components: mean z² = 1, or √(π/2) mean |z| = 1."""
    llpr = copy.deepcopy(fitted(name))
    structures = force_labelled(training_set(5, seed=70))
    graphs = force_graphs(structures, llpr)
    beta = calibrate_forces(llpr, graphs, method, batch_size=2)
    assert beta > 0 and float(llpr.state.force_scale) == beta
    z = []
    for atoms, graph in zip(structures, graphs, strict=True):
        outputs = run(llpr, graph)
        error = outputs[keys.FORCES] - atoms.get_forces()
        sigma = outputs[keys.FORCES_UNCERTAINTY]
        usable = sigma > 0  # a component no member moves has no z-score
        z.append(error[usable] / sigma[usable])
    z = np.concatenate(z)
    if method == "squared_residuals":
        assert np.mean(z**2) == pytest.approx(1.0, rel=1e-9)
    else:
        assert math.sqrt(math.pi / 2) * np.mean(np.abs(z)) == pytest.approx(
            1.0, rel=1e-9
        )
    # refitting on the same data is idempotent: β is relative to β = 1
    assert calibrate_forces(llpr, graphs, method, batch_size=3) == pytest.approx(
        beta, rel=1e-9
    )


def test_raw_force_errors_need_members_and_labels():
    llpr = fitted("soap_bpnn")
    unlabelled = graphs_of(emt_labelled(training_set(2, seed=71)), llpr)
    with pytest.raises(ValueError, match="force labels"):
        raw_force_errors(llpr, unlabelled)
    without_members = with_members(llpr, 0)
    with pytest.raises(ValueError, match="ensemble members"):
        raw_force_errors(without_members, unlabelled)


def test_wrap_calibrates_energies_and_forces_each_on_its_own():
    model = small_model("soap_bpnn")
    train = graphs_of(emt_labelled(training_set(12, seed=0)), model)
    val_structures = force_labelled(training_set(6, seed=100))
    val = force_graphs(val_structures, model)
    llpr = wrap(model, MEMBERS, train, val, batch_size=5, seed=1)
    settings = llpr.config["llpr"]
    beta = float(llpr.state.force_scale)
    assert settings["force_scale"] == beta != 1.0
    assert settings["forces_multiplier"] == pytest.approx(settings["multiplier"] * beta)
    # the energy α is what energies alone give
    energy_only = wrap(
        copy.deepcopy(model),
        MEMBERS,
        train,
        graphs_of(val_structures, model),
        batch_size=5,
        seed=1,
    )
    assert float(energy_only.state.multiplier) == pytest.approx(
        settings["multiplier"], rel=1e-12
    )
    assert float(energy_only.state.force_scale) == 1.0
    assert "force_scale" not in energy_only.config["llpr"]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_files_with_one_alpha_load_with_unscaled_forces(name, tmp_path):
    """A file from before per-property calibration (no force_scale tensor, no
    digests) loads with β = 1: its forces' uncertainties are as they were."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    llpr = copy.deepcopy(fitted(name))
    save_model(llpr, tmp_path / "new.safetensors")
    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as handle:
        header = dict(handle.metadata())
    del header["digests"]
    tensors = load_file(str(tmp_path / "new.safetensors"))
    del tensors["state.force_scale"]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=header)
    with pytest.warns(UserWarning, match="cannot be checked"):
        old = load_model(tmp_path / "old.safetensors")
    assert float(old.state.force_scale) == 1.0
    graph = graph_of(structure("bulk", 7), llpr)
    for key, value in run(llpr, graph).items():
        np.testing.assert_array_equal(run(old, graph)[key], value, err_msg=key)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_force_scale_survives_torchscript(name, tmp_path):
    llpr = copy.deepcopy(fitted(name))
    llpr.state.force_scale.fill_(2.5)
    compile_model(llpr, tmp_path / "llpr.pt")
    artefact, _ = load_artefact(tmp_path / "llpr.pt")
    graph = graph_of(structure("bulk", 7), llpr)
    expected, got = run(llpr, graph), run(artefact, graph)
    np.testing.assert_allclose(
        got[keys.FORCES_UNCERTAINTY], expected[keys.FORCES_UNCERTAINTY], rtol=1e-10
    )


def test_fitting_names_still_import_from_the_old_path_with_a_warning():
    moved = "pes_calc.llpr.wrap moved to pes_calc.train.llpr.wrap"
    with pytest.warns(DeprecationWarning, match=moved):
        from pes_calc.llpr import wrap as old_wrap
    assert old_wrap is wrap
    for name in ("calibrate", "CALIBRATION_METHODS"):
        with pytest.warns(DeprecationWarning, match=f"pes_calc.train.llpr.{name}"):
            old = getattr(pes_calc.llpr, name)
        assert old is getattr(pes_calc.train.llpr, name)
    moved = "pes_calc.train.llpr_ensemble.LinearisedEnsemble"
    with pytest.warns(DeprecationWarning, match=moved):
        old = pes_calc.llpr.LinearisedEnsemble
    assert old is pes_calc.train.llpr_ensemble.LinearisedEnsemble
    # the runtime names stay, without a warning; unknown names are still errors
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pes_calc.llpr.LLPR is LLPR
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = pes_calc.llpr.no_such_name


# ---------------------------------------------------------------- invariances


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_uncertainties_are_invariant(name):
    llpr = fitted(name)
    atoms = structure("bulk", 70)
    reference = run(llpr, graph_of(atoms, llpr))
    deviations = reference[keys.FORCES_ENSEMBLE] - reference[keys.FORCES]
    assert np.abs(deviations).max() > 1e-6  # a test with something to rotate

    rotation = random_rotation(seed=5)
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ rotation.T
    rotated.cell = atoms.cell.array @ rotation.T
    translated = atoms.copy()
    translated.positions += np.array([0.4, -1.3, 2.1])
    order = np.random.default_rng(6).permutation(len(atoms))
    for transformed, permutation, matrix in (
        (rotated, np.arange(len(atoms)), rotation),
        (translated, np.arange(len(atoms)), np.eye(3)),
        (atoms[order], order, np.eye(3)),
    ):
        outputs = run(llpr, graph_of(transformed, llpr))
        scale = np.abs(reference[keys.FORCES_ENSEMBLE]).max()
        np.testing.assert_allclose(
            outputs[keys.ENERGY_UNCERTAINTY],
            reference[keys.ENERGY_UNCERTAINTY],
            rtol=1e-8,
        )
        np.testing.assert_allclose(
            outputs[keys.ENERGIES_UNCERTAINTY],
            reference[keys.ENERGIES_UNCERTAINTY][permutation],
            rtol=1e-8,
        )
        np.testing.assert_allclose(
            outputs[keys.ENERGY_ENSEMBLE], reference[keys.ENERGY_ENSEMBLE], rtol=1e-8
        )
        # each member's forces rotate with the structure ...
        np.testing.assert_allclose(
            outputs[keys.FORCES_ENSEMBLE],
            reference[keys.FORCES_ENSEMBLE][:, permutation] @ matrix.T,
            atol=1e-8 * scale,
        )
        # ... so the per-atom norm of the force σ is invariant (its components are not)
        np.testing.assert_allclose(
            np.linalg.norm(outputs[keys.FORCES_UNCERTAINTY], axis=-1),
            np.linalg.norm(reference[keys.FORCES_UNCERTAINTY][permutation], axis=-1),
            rtol=1e-7,
            atol=1e-8 * scale,
        )
    # translation and permutation keep every component
    outputs = run(llpr, graph_of(atoms[order], llpr))
    np.testing.assert_allclose(
        outputs[keys.FORCES_UNCERTAINTY],
        reference[keys.FORCES_UNCERTAINTY][order],
        rtol=1e-7,
        atol=1e-10,
    )


# ---------------------------------------------------------------- ensemble


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_ensemble_mean_is_the_model(name):
    llpr = fitted(name)
    outputs = run(
        llpr, batch_graphs([graph_of(atoms, llpr) for atoms in three_structures()])
    )
    assert outputs[keys.ENERGY_ENSEMBLE].shape == (3, MEMBERS)
    forces_shape = outputs[keys.FORCES].shape
    assert outputs[keys.FORCES_ENSEMBLE].shape == (MEMBERS, *forces_shape)
    assert np.std(outputs[keys.ENERGY_ENSEMBLE], axis=1).min() > 0
    np.testing.assert_allclose(
        outputs[keys.ENERGY_ENSEMBLE].mean(axis=1),
        outputs[keys.ENERGY],
        rtol=0,
        atol=1e-10,
    )
    np.testing.assert_allclose(
        outputs[keys.FORCES_ENSEMBLE].mean(axis=0),
        outputs[keys.FORCES],
        rtol=0,
        atol=1e-10 * max(1.0, np.abs(outputs[keys.FORCES_ENSEMBLE]).max()),
    )


@pytest.mark.parametrize("branch", ["by_member", "by_feature"])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_ensemble_forces_are_minus_the_member_energy_gradients(name, branch):
    base = fitted(name)
    members = 3 if branch == "by_member" else base.num_features + 2
    llpr = with_members(base, members, seed=2)
    atoms = structure("bulk", 80)
    outputs = run(llpr, graph_of(atoms, llpr))

    def member_energy(k):
        return lambda a: float(
            run(llpr, graph_of(a, llpr), False)[keys.ENERGY_ENSEMBLE][0, k]
        )

    for k in range(members):
        numerical = numerical_forces(member_energy(k), atoms, h=1e-5)
        scale = max(1.0, np.abs(numerical).max())
        np.testing.assert_allclose(
            outputs[keys.FORCES_ENSEMBLE][k], numerical, rtol=0, atol=2e-7 * scale
        )
    deviations = outputs[keys.FORCES_ENSEMBLE] - outputs[keys.FORCES]
    np.testing.assert_allclose(
        outputs[keys.FORCES_UNCERTAINTY],
        np.sqrt(np.mean(deviations**2, axis=0)),
        rtol=1e-10,
    )


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_both_ensemble_gradient_branches_agree(name):
    """Per member (M ≤ F) and through the feature Jacobian (M > F)."""
    llpr = fitted(name)
    features = llpr.num_features
    generator = torch.Generator().manual_seed(3)
    displacements = torch.randn(
        features, features + 3, generator=generator, dtype=torch.float64
    )
    graph = batch_graphs([graph_of(atoms, llpr) for atoms in three_structures()])

    def gradients(columns: Tensor) -> Tensor:
        outputs, positions, _ = llpr.potential.predict_energies(graph, True, False)
        atom_features = llpr.llpr_features(
            outputs[keys.LAST_LAYER_FEATURES], graph.species
        )
        return llpr._ensemble_energy_gradients(
            sum_per_structure(atom_features, graph), positions, columns
        )

    by_feature = gradients(displacements)  # M = F + 3 > F
    by_member = gradients(displacements[:, :features])  # M = F
    assert by_feature.shape == (features + 3, graph.positions.shape[0], 3)
    assert by_member.abs().max() > 0
    torch.testing.assert_close(by_feature[:features], by_member, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_large_ensemble_spread_matches_the_uncertainty(name):
    """M = 20000 (energy only): the ensemble std per structure is σ_E within 3 %."""
    llpr = with_members(fitted(name), 20_000, seed=4)
    outputs = run(
        llpr, batch_graphs([graph_of(a, llpr) for a in three_structures()]), False
    )
    spread = outputs[keys.ENERGY_ENSEMBLE].std(axis=1)
    np.testing.assert_allclose(spread, outputs[keys.ENERGY_UNCERTAINTY], rtol=0.03)


# ---------------------------------------------------------------- artefacts


UNCERTAINTY_KEYS = (
    keys.ENERGY_UNCERTAINTY,
    keys.ENERGIES_UNCERTAINTY,
    keys.ENERGY_ENSEMBLE,
    keys.FORCES_ENSEMBLE,
    keys.FORCES_UNCERTAINTY,
)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_torchscript_artefact_matches_eager(name, tmp_path):
    llpr = fitted(name)
    path = tmp_path / "llpr.pt"
    compile_model(llpr, path)
    artefact, metadata = load_artefact(path)
    assert metadata["llpr"] == llpr.config["llpr"]
    graph = batch_graphs([graph_of(atoms, llpr) for atoms in three_structures()])
    eager, scripted = run(llpr, graph), run(artefact, graph)
    assert set(UNCERTAINTY_KEYS) <= set(scripted)
    for key in eager:
        np.testing.assert_allclose(
            scripted[key], eager[key], rtol=1e-10, atol=1e-10, err_msg=key
        )


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_safetensors_round_trip(name, tmp_path):
    llpr = fitted(name)
    save_model(llpr, tmp_path / "llpr.safetensors")
    loaded = load_model(tmp_path / "llpr.safetensors")
    assert isinstance(loaded, LLPR)
    assert loaded.config["llpr"] == llpr.config["llpr"]
    assert loaded.num_ensemble_members == MEMBERS
    graph = batch_graphs([graph_of(atoms, llpr) for atoms in three_structures()])
    original, reloaded = run(llpr, graph), run(loaded, graph)
    assert set(UNCERTAINTY_KEYS) <= set(reloaded)
    for key in original:
        np.testing.assert_array_equal(reloaded[key], original[key], err_msg=key)


def test_float32_model_keeps_float64_state(tmp_path):
    llpr64 = fitted("nequip")  # a well-conditioned C: float32 features change σ little
    llpr32 = copy.deepcopy(llpr64).to(torch.float32)
    state = dict(llpr32.state.named_buffers()) | dict(llpr32.state.named_parameters())
    # 7 buffers (with force_scale and the two energy-σ weights) and the
    # displacements
    assert len(state) == 8
    for tensor_name, tensor in state.items():
        assert tensor.dtype == torch.float64, tensor_name
        assert torch.equal(tensor, getattr(llpr64.state, tensor_name))
    assert llpr32.potential.architecture.last_layer.weight.dtype == torch.float32
    for cast in (torch.nn.Module.half, torch.nn.Module.float, torch.nn.Module.double):
        assert cast(copy.deepcopy(llpr32)).state.inverse_cholesky.dtype == torch.float64
    graph = graph_of(structure("bulk", 90), llpr64)
    single = run(
        llpr32,
        graph._replace(
            positions=graph.positions.float(),
            cell=graph.cell.float(),
            edge_cell_shifts=graph.edge_cell_shifts.float(),
        ),
    )
    double = run(llpr64, graph)
    assert single[keys.ENERGY_UNCERTAINTY].dtype == np.float32
    for key in (keys.ENERGY_UNCERTAINTY, keys.ENERGIES_UNCERTAINTY):
        np.testing.assert_allclose(single[key], double[key], rtol=1e-4)
    # the compiled float32 artefact keeps them too
    compile_model(llpr64, tmp_path / "f32.pt", dtype=torch.float32)
    artefact, metadata = load_artefact(tmp_path / "f32.pt")
    assert metadata["dtype"] == "float32"
    assert artefact.state.inverse_cholesky.dtype == torch.float64
    assert artefact.state.ensemble_displacements.dtype == torch.float64


# ---------------------------------------------------------------- no edges


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_structures_without_edges(name):
    llpr = fitted(name)
    single = ase.Atoms("Ag", positions=[[0.0, 0.0, 0.0]])
    far = 3.0 * llpr.cutoff
    apart = ase.Atoms(
        "CuAgCu",
        positions=[[0, 0, 0], [far, 0, 0], [0, far, far]],
        cell=np.eye(3) * 10 * far,
        pbc=False,
    )
    results = []
    for atoms in (single, apart):
        graph = graph_of(atoms, llpr)
        assert graph.edge_index.shape[1] == 0
        outputs = run(llpr, graph)
        for key in (
            keys.ENERGY_UNCERTAINTY,
            keys.ENERGIES_UNCERTAINTY,
            keys.ENERGY_ENSEMBLE,
        ):
            assert np.isfinite(outputs[key]).all(), key
        np.testing.assert_array_equal(
            outputs[keys.FORCES_ENSEMBLE] - outputs[keys.FORCES], 0.0
        )
        np.testing.assert_array_equal(outputs[keys.FORCES_UNCERTAINTY], 0.0)
        results.append(outputs)
    # per-atom σ is local: the far-apart Ag has the isolated Ag's
    np.testing.assert_allclose(
        results[1][keys.ENERGIES_UNCERTAINTY][1],
        results[0][keys.ENERGIES_UNCERTAINTY][0],
        rtol=1e-12,
    )
