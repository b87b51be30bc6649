"""Tests of `pes_calc.config`: YAML loading, key checks with did-you-mean hints,
flat defaults and nested hyperparameter merges."""

import pytest

from pes_calc.config import (
    ConfigError,
    check_keys,
    load_yaml,
    merge_hypers,
    with_defaults,
)

DEFAULTS = {"batch_size": 8, "learning_rate": 1e-3, "loss": {"energy": 1.0}}
HYPERS = {
    "soap": {"max_angular": 6, "cutoff": {"radius": 5.0, "width": 0.5}},
    "bpnn": {"num_hidden_layers": 2, "layernorm": True},
    "zbl": False,
    "avg_num_neighbors": None,
}


# ---- load_yaml ---------------------------------------------------------------------


def test_load_yaml_reads_a_mapping(tmp_path):
    path = tmp_path / "options.yaml"
    path.write_text(
        "architecture:\n  name: soap_bpnn\n  model:\n    soap: {max_angular: 2}\n"
        "seed: 3\nspecies: [Cu, Ag]\nlearning_rate: 1.0e-3\n"
    )
    config = load_yaml(path)
    assert config == {
        "architecture": {"name": "soap_bpnn", "model": {"soap": {"max_angular": 2}}},
        "seed": 3,
        "species": ["Cu", "Ag"],
        "learning_rate": 1e-3,
    }
    assert load_yaml(str(path)) == config  # a str path too


def test_load_yaml_missing_file(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match=r"cannot read the config") as error:
        load_yaml(path)
    assert str(path) in str(error.value)
    assert "No such file or directory" in str(error.value)
    assert isinstance(error.value, ValueError)


def test_load_yaml_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read the config"):
        load_yaml(tmp_path)


def test_load_yaml_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("architecture:\n  name: [soap_bpnn\n  model: {}\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml is not valid YAML"):
        load_yaml(path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n", ""])
def test_load_yaml_not_a_mapping(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"list\.yaml is not a YAML mapping"):
        load_yaml(path)


# ---- check_keys --------------------------------------------------------------------


def test_check_keys_accepts_known_keys():
    check_keys(["batch_size"], DEFAULTS, "training")
    check_keys([], DEFAULTS, "training")
    check_keys(DEFAULTS, DEFAULTS, "training")


def test_check_keys_suggests_a_close_name():
    with pytest.raises(ConfigError) as error:
        check_keys(["batch_sise", "loss"], DEFAULTS, "training")
    message = str(error.value)
    assert message.startswith("unknown training keys ['batch_sise']")
    assert "'batch_sise': did you mean 'batch_size'?" in message
    assert message.endswith("known: batch_size, learning_rate, loss")


def test_check_keys_no_hint_for_a_far_name():
    with pytest.raises(ConfigError) as error:
        check_keys(["zzzz"], DEFAULTS, "training")
    message = str(error.value)
    assert "did you mean" not in message
    assert message == (
        "unknown training keys ['zzzz']; known: batch_size, learning_rate, loss"
    )


def test_check_keys_lists_every_unknown_key_and_hints_the_close_ones():
    with pytest.raises(ConfigError) as error:
        check_keys(["learning_rat", "zzzz", "los"], DEFAULTS, "training")
    message = str(error.value)
    assert "['learning_rat', 'los', 'zzzz']" in message
    assert "'learning_rat': did you mean 'learning_rate'?" in message
    assert "'los': did you mean 'loss'?" in message
    assert "'zzzz': did you mean" not in message


def test_check_keys_compares_as_strings():
    check_keys([1], {"1": None}, "numbers")
    with pytest.raises(ConfigError, match=r"unknown numbers keys \['2'\]"):
        check_keys([2], {"1": None}, "numbers")


# ---- with_defaults -----------------------------------------------------------------


def test_with_defaults_fills_in():
    result = with_defaults({"batch_size": 2}, DEFAULTS, "training")
    assert result == {"batch_size": 2, "learning_rate": 1e-3, "loss": {"energy": 1.0}}


def test_with_defaults_of_none_is_the_defaults():
    assert with_defaults(None, DEFAULTS, "training") == DEFAULTS
    assert with_defaults({}, DEFAULTS, "training") == DEFAULTS


def test_with_defaults_deep_copies():
    given = {"loss": {"forces": 10.0}}
    result = with_defaults(given, DEFAULTS, "training")
    # a flat section: a given mapping replaces the default one, it does not merge
    assert result["loss"] == {"forces": 10.0}
    result["loss"]["forces"] = 0.0
    assert given == {"loss": {"forces": 10.0}}
    defaulted = with_defaults(None, DEFAULTS, "training")
    defaulted["loss"]["energy"] = 99.0
    defaulted["batch_size"] = 1
    assert DEFAULTS == {"batch_size": 8, "learning_rate": 1e-3, "loss": {"energy": 1.0}}
    assert with_defaults(None, DEFAULTS, "training")["loss"] == {"energy": 1.0}


def test_with_defaults_checks_keys():
    with pytest.raises(ConfigError, match=r"unknown training keys.*'batch_size'"):
        with_defaults({"batchsize": 4}, DEFAULTS, "training")


@pytest.mark.parametrize("given", [[("batch_size", 2)], "batch_size", 3])
def test_with_defaults_needs_a_mapping(given):
    with pytest.raises(ConfigError, match=r"^training must be a mapping, got "):
        with_defaults(given, DEFAULTS, "training")


# ---- merge_hypers ------------------------------------------------------------------


def test_merge_hypers_merges_nested_mappings():
    merged = merge_hypers(HYPERS, {"soap": {"cutoff": {"radius": 4.0}}, "zbl": True})
    assert merged == {
        "soap": {"max_angular": 6, "cutoff": {"radius": 4.0, "width": 0.5}},
        "bpnn": {"num_hidden_layers": 2, "layernorm": True},
        "zbl": True,
        "avg_num_neighbors": None,
    }


def test_merge_hypers_non_mapping_value_replaces():
    # a mapping where the default is not one (per-species values) ...
    merged = merge_hypers(HYPERS, {"avg_num_neighbors": {"Cu": 10.0, "Ag": 12.0}})
    assert merged["avg_num_neighbors"] == {"Cu": 10.0, "Ag": 12.0}
    # ... and a non-mapping where the default is one
    assert merge_hypers(HYPERS, {"bpnn": None})["bpnn"] is None


def test_merge_hypers_copies():
    given = {"bpnn": {"layernorm": False}, "avg_num_neighbors": {"Cu": 10.0}}
    merged = merge_hypers(HYPERS, given)
    merged["soap"]["cutoff"]["radius"] = 1.0
    merged["avg_num_neighbors"]["Cu"] = 1.0
    merged["bpnn"]["layernorm"] = None
    assert HYPERS["soap"]["cutoff"]["radius"] == 5.0
    assert HYPERS["bpnn"]["layernorm"] is True
    assert given == {"bpnn": {"layernorm": False}, "avg_num_neighbors": {"Cu": 10.0}}


def test_merge_hypers_unknown_top_level_key():
    with pytest.raises(ConfigError) as error:
        merge_hypers(HYPERS, {"zbI": True})
    message = str(error.value)
    assert message.startswith("unknown hyperparameter keys ['zbI']")
    assert "did you mean 'zbl'?" in message


def test_merge_hypers_unknown_nested_key_names_its_section():
    with pytest.raises(ConfigError) as error:
        merge_hypers(HYPERS, {"bpnn": {"layer_norm": False}})
    message = str(error.value)
    assert message.startswith("unknown bpnn hyperparameter keys ['layer_norm']")
    assert "did you mean 'layernorm'?" in message
    assert message.endswith("known: layernorm, num_hidden_layers")
    with pytest.raises(ConfigError, match=r"^unknown soap\.cutoff hyperparameter keys"):
        merge_hypers(HYPERS, {"soap": {"cutoff": {"widht": 1.0}}})


def test_merge_hypers_section_name_prefix():
    with pytest.raises(ConfigError, match=r"^unknown model\.bpnn hyperparameter keys"):
        merge_hypers(HYPERS, {"bpnn": {"depth": 1}}, "model.")
