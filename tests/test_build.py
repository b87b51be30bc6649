"""Tests of `pes_calc.build`: names and YAML sections, errors, seeds and the global
RNG, dtypes, `cutoff_of` and `pair_potential_from`."""

import pytest
import torch

from pes_calc import build_model
from pes_calc.build import cutoff_of, pair_potential_from
from pes_calc.config import ConfigError
from pes_calc.nn.zbl import ZBL
from pes_calc.potential import Potential

SPECIES = ["Cu", "Ag"]
SOAP = {"max_angular": 2, "max_radial": 2}
BPNN = {"num_hidden_layers": 1, "num_neurons_per_layer": 8}
SMALL = {"soap": SOAP, "bpnn": BPNN}
SMALL_NEQUIP = {"num_layers": 1, "num_features": 4, "l_max": 1}
SMALL_ALLEGRO = {
    "num_layers": 1,
    "num_scalar_features": 8,
    "num_tensor_features": 2,
    "l_max": 1,
}


def _small(**hypers) -> Potential:
    return build_model("soap_bpnn", SPECIES, **{**SMALL, **hypers})


def _weights(model: Potential) -> dict:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _assert_same_weights(a: Potential, b: Potential) -> None:
    first, second = _weights(a), _weights(b)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0, msg=name)


def _differ(a: Potential, b: Potential) -> bool:
    first, second = _weights(a), _weights(b)
    return any(not torch.equal(first[name], second[name]) for name in first)


# ---- by name and by section --------------------------------------------------------


def test_build_by_name():
    model = _small(seed=0)
    assert isinstance(model, Potential)
    assert model.species == SPECIES
    assert model.cutoff == 5.0
    assert not model.training  # built for inference
    assert model.config["name"] == "soap_bpnn"
    assert model.config["species"] == SPECIES
    hypers = model.config["model"]
    # the given values merged over the defaults, nested ones key by key
    assert hypers["soap"] == {**SOAP, "cutoff": {"radius": 5.0, "width": 0.5}}
    assert hypers["bpnn"] == {**BPNN, "layernorm": True}
    assert hypers["seed"] == 0 and hypers["model_dtype"] == "float32"


def test_build_from_section_equals_build_by_name():
    by_name = _small(seed=3, per_type_energy_shifts=[-1.0, -2.0])
    section = {
        "name": "soap_bpnn",
        "species": SPECIES,
        "model": {**SMALL, "seed": 3, "per_type_energy_shifts": [-1.0, -2.0]},
    }
    from_section = build_model(section)
    assert from_section.species == SPECIES
    assert from_section.config == by_name.config
    _assert_same_weights(from_section, by_name)
    assert from_section.per_type_energy_shifts.tolist() == [-1.0, -2.0]
    # a model's own config rebuilds it exactly
    _assert_same_weights(build_model(by_name.config), by_name)


def test_section_species_and_hypers_can_be_overridden():
    section = {"name": "soap_bpnn", "species": ["Cu"], "model": {**SMALL, "seed": 1}}
    model = build_model(section, ["Ag", "Cu"], seed=2, per_type_energy_scales=3.0)
    assert model.species == ["Ag", "Cu"]
    assert model.config["model"]["seed"] == 2
    assert model.per_type_energy_scales.tolist() == [3.0, 3.0]
    assert section["model"]["seed"] == 1  # the caller's section is left alone
    _assert_same_weights(
        model,
        build_model(
            "soap_bpnn", ["Ag", "Cu"], **SMALL, seed=2, per_type_energy_scales=3.0
        ),
    )


def test_section_without_name_or_species():
    with pytest.raises(ValueError, match="needs a 'name'"):
        build_model({"model": SMALL}, SPECIES)
    with pytest.raises(ValueError, match="needs the species"):
        build_model({"name": "soap_bpnn", "model": SMALL})


def test_section_with_a_misspelt_key_is_an_error():
    section = {"name": "soap_bpnn", "species": ["Cu"], "modle": SMALL}
    with pytest.raises(ValueError, match=r"modle"):
        build_model(section)


def test_section_with_an_empty_model():
    section = {"name": "soap_bpnn", "species": ["Cu"], "model": None}
    try:  # the defaults (as with_defaults reads None), or a clear ValueError
        model = build_model(section)
    except ValueError:
        return
    assert model.config["model"]["soap"]["max_angular"] == 6


# ---- errors ------------------------------------------------------------------------


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown architecture 'soap'") as error:
        build_model("soap", SPECIES)
    assert "allegro, nequip, soap_bpnn" in str(error.value)
    with pytest.raises(ValueError, match=r"unknown architecture 'mace'"):
        cutoff_of("mace", {})


def test_unknown_hyperparameter_suggests_the_nearest_name():
    with pytest.raises(ConfigError, match=r"did you mean 'bpnn'") as error:
        build_model("soap_bpnn", ["Cu"], bpn={})
    assert isinstance(error.value, ValueError)
    assert "'bpn'" in str(error.value)
    assert "known: add_lambda_basis, bpnn," in str(error.value)


def test_unknown_nested_hyperparameter_names_its_section():
    with pytest.raises(ConfigError, match=r"unknown soap hyperparameter keys") as error:
        build_model("soap_bpnn", ["Cu"], soap={"max_angualr": 2})
    assert "did you mean 'max_angular'" in str(error.value)
    with pytest.raises(ConfigError, match=r"soap\.cutoff hyperparameter.*'radius'"):
        build_model("soap_bpnn", ["Cu"], soap={"cutoff": {"radios": 3.0}})
    with pytest.raises(ConfigError, match=r"did you mean 'num_scalar_features'"):
        build_model("allegro", ["Cu"], num_scalar_feature=8)


def test_far_typo_has_no_suggestion():
    with pytest.raises(ConfigError, match=r"hyperparameter keys \['xyz'\]") as error:
        build_model("soap_bpnn", ["Cu"], xyz=1)
    assert "did you mean" not in str(error.value)


@pytest.mark.parametrize(
    "species",
    [["Cu", "Cu"], ["Cu", "Xx"], ["cu"]],
    ids=["duplicate", "unknown", "lower-case"],
)
def test_bad_species(species):
    with pytest.raises(ValueError, match=r"species must be distinct chemical symbols"):
        build_model("soap_bpnn", species, **SMALL)


@pytest.mark.parametrize("species", [None, []])
def test_missing_species(species):
    with pytest.raises(ValueError, match="needs the species"):
        build_model("soap_bpnn", species, **SMALL)


# ---- seeds and the global RNG ------------------------------------------------------


@pytest.fixture
def restore_rng():
    """These tests reseed the global RNG: give the others back their state."""
    with torch.random.fork_rng(devices=[]):
        yield


def test_seed_gives_identical_weights():
    first, second = _small(seed=7), _small(seed=7)
    _assert_same_weights(first, second)
    assert _differ(first, _small(seed=8))


def test_seed_leaves_the_global_rng_alone(restore_rng):
    torch.manual_seed(1234)
    expected = torch.rand(5)
    torch.manual_seed(1234)
    _small(seed=7)
    torch.testing.assert_close(torch.rand(5), expected, rtol=0, atol=0)


def test_no_seed_draws_from_and_advances_the_global_rng(restore_rng):
    torch.manual_seed(1234)
    untouched = torch.rand(5)
    torch.manual_seed(1234)
    drawn = _small(seed=None)
    after = torch.rand(5)
    assert not torch.equal(after, untouched)
    # the global RNG seeded with 7 gives the weights of seed=7
    torch.manual_seed(7)
    _assert_same_weights(_small(), _small(seed=7))
    assert _differ(drawn, _small(seed=7))


# ---- dtypes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling, dtype, name",
    [
        ("float32", torch.float32, "float32"),
        ("float64", torch.float64, "float64"),
        (torch.float64, torch.float64, "float64"),
        (torch.float32, torch.float32, "float32"),
        ("torch.float64", torch.float64, "float64"),
        ("double", torch.float64, "float64"),
    ],
)
def test_model_dtype_spellings(spelling, dtype, name):
    model = _small(seed=0, model_dtype=spelling)
    floats = [p for p in model.state_dict().values() if p.is_floating_point()]
    assert floats and all(p.dtype == dtype for p in floats)
    assert model.per_type_energy_scales.dtype == dtype
    assert model.config["model"]["model_dtype"] == name  # a name, not a torch.dtype


def test_bad_model_dtype():
    with pytest.raises(ValueError, match=r"model_dtype 'float16' is not one"):
        _small(model_dtype="float16")


def test_float32_model_has_the_float64_models_weights_rounded():
    single, double = _small(seed=4), _small(seed=4, model_dtype="float64")
    for name, value in double.state_dict().items():
        expected = value.to(torch.float32) if value.is_floating_point() else value
        torch.testing.assert_close(
            single.state_dict()[name], expected, rtol=0, atol=0, msg=name
        )


def test_default_dtype_unchanged_by_a_float64_build():
    assert torch.get_default_dtype() == torch.float32
    _small(seed=0, model_dtype="float64")
    build_model("nequip", ["Cu"], seed=0, model_dtype="float64", **SMALL_NEQUIP)
    assert torch.get_default_dtype() == torch.float32
    assert torch.zeros(1).dtype == torch.float32


# ---- cutoff_of ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, hypers, cutoff",
    [
        ("soap_bpnn", SMALL, 5.0),
        ("soap_bpnn", {**SMALL, "soap": {**SOAP, "cutoff": {"radius": 4.25}}}, 4.25),
        ("nequip", SMALL_NEQUIP, 5.0),
        ("nequip", {**SMALL_NEQUIP, "r_max": 3.5}, 3.5),
        ("allegro", SMALL_ALLEGRO, 5.0),
        ("allegro", {**SMALL_ALLEGRO, "r_max": 4}, 4.0),
    ],
)
def test_cutoff_of_equals_the_built_models_cutoff(name, hypers, cutoff):
    assert cutoff_of(name, hypers) == cutoff
    assert isinstance(cutoff_of(name, hypers), float)
    assert build_model(name, ["Cu"], seed=0, **hypers).cutoff == cutoff


def test_cutoff_of_checks_its_hypers():
    with pytest.raises(ValueError, match=r"cutoff of a nequip model must be a number"):
        cutoff_of("nequip", {"r_max": "5"})
    with pytest.raises(ConfigError, match=r"did you mean 'r_max'"):
        cutoff_of("allegro", {"rmax": 4.0})


# ---- pair potentials ---------------------------------------------------------------


def test_pair_potential_from_none():
    assert pair_potential_from(None, SPECIES, 5.0) is None


@pytest.mark.parametrize(
    "spec, units",
    [
        ("ZBL", "metal"),
        ("zbl", "metal"),
        ({"name": "ZBL"}, "metal"),
        ({"name": "ZBL", "units": "real"}, "real"),
    ],
)
def test_pair_potential_from_zbl(spec, units):
    zbl = pair_potential_from(spec, SPECIES, 5.0)
    assert isinstance(zbl, ZBL)
    assert zbl.units == units
    # covalent-radius sums (Cu 1.32, Ag 1.45 Å), below the cutoff
    torch.testing.assert_close(
        zbl.pair_range,
        torch.tensor([[2.64, 2.77], [2.77, 2.90]], dtype=torch.float64),
    )


def test_pair_potential_real_units_are_kcal_per_mol():
    metal = pair_potential_from("ZBL", SPECIES, 5.0)
    real = pair_potential_from({"name": "ZBL", "units": "real"}, SPECIES, 5.0)
    lengths = torch.tensor([1.0, 1.5], dtype=torch.float64)
    species = torch.tensor([0, 1])
    ratio = real(lengths, species, species) / metal(lengths, species, species)
    torch.testing.assert_close(
        ratio, torch.full((2,), 332.06371 / 14.399645478425668, dtype=torch.float64)
    )


def test_pair_range_is_clamped_to_the_cutoff():
    zbl = pair_potential_from("ZBL", SPECIES, 2.7)
    torch.testing.assert_close(
        zbl.pair_range,
        torch.tensor([[2.64, 2.7], [2.7, 2.7]], dtype=torch.float64),
    )


def test_pair_potential_from_rejects_a_misspelt_key():
    with pytest.raises(ValueError, match=r"unknown pair_potential keys \['unit'\]"):
        pair_potential_from({"name": "ZBL", "unit": "real"}, SPECIES, 5.0)


@pytest.mark.parametrize("spec", ["LJ", {"name": "LJ"}, {"units": "real"}])
def test_pair_potential_from_rejects_other_potentials(spec):
    with pytest.raises(ValueError, match=r"only ZBL is available"):
        pair_potential_from(spec, SPECIES, 5.0)


def test_pair_potential_from_rejects_bad_units():
    with pytest.raises(ValueError, match=r"ZBL units must be 'metal' or 'real'"):
        pair_potential_from({"name": "ZBL", "units": "si"}, SPECIES, 5.0)


@pytest.mark.parametrize(
    "name, hypers, units",
    [
        ("soap_bpnn", {**SMALL, "zbl": True}, "metal"),
        (
            "nequip",
            {**SMALL_NEQUIP, "pair_potential": {"name": "ZBL", "units": "real"}},
            "real",
        ),
        ("allegro", {**SMALL_ALLEGRO, "pair_potential": "ZBL"}, "metal"),
    ],
)
def test_each_architecture_takes_its_own_zbl_hyperparameter(name, hypers, units):
    model = build_model(name, SPECIES, seed=0, **hypers)
    assert isinstance(model.pair_potential, ZBL)
    assert model.pair_potential.units == units
    plain = {k: v for k, v in hypers.items() if k not in ("zbl", "pair_potential")}
    assert build_model(name, SPECIES, seed=0, **plain).pair_potential is None


def test_soap_bpnn_has_no_pair_potential_hyperparameter():
    with pytest.raises(ConfigError, match=r"unknown hyperparameter keys"):
        _small(pair_potential="ZBL")
