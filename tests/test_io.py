"""Tests of `pes_calc.io`: the safetensors model file."""

import json
import pickle

import ase.build
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pes_calc import build_model, keys
from pes_calc.io import (
    FORMAT_TAG,
    FORMAT_VERSION,
    ModelFileError,
    load_model,
    read_metadata,
    save_model,
)
from pes_calc.neighbors import atoms_to_graph

SOAP = {"max_angular": 2, "max_radial": 2}


def _model(**hypers):
    return build_model("soap_bpnn", ["Cu", "Ag"], soap=SOAP, seed=0, **hypers)


@pytest.fixture(scope="module")
def model():
    model = _model(
        model_dtype="float64",
        per_type_energy_shifts=[-3.5, -2.25],
        per_type_energy_scales=[0.5, 2.0],
    )
    model.config["training_data_stats"] = {"mean_energy_per_atom": -3.1, "count": 7}
    # eval: a loaded model is in eval mode, and training mode differentiates with
    # create_graph=True, which changes round-off
    return model.eval()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("io") / "model.safetensors"
    save_model(model, path)
    return path


@pytest.fixture(scope="module")
def graph():
    atoms = ase.build.bulk("Cu", "fcc", a=3.7, cubic=True) * (2, 1, 1)
    atoms.symbols[[1, 4, 6]] = "Ag"
    atoms.rattle(0.1, seed=0)
    return atoms_to_graph(atoms, ["Cu", "Ag"], 5.0)


def _header(path):
    """The header without its digests: the files these tests forge are checked by
    their content, as files written before digests are."""
    with safe_open(str(path), framework="pt") as handle:
        header = dict(handle.metadata())
    header.pop("digests", None)
    return header


def test_round_trip_same_state_dict(model, saved):
    loaded = load_model(saved)
    original = model.state_dict()
    restored = loaded.state_dict()
    assert restored.keys() == original.keys()
    for name, tensor in original.items():
        assert restored[name].dtype == tensor.dtype, name
        assert torch.equal(restored[name], tensor), name
    assert loaded.species == ["Cu", "Ag"]
    assert loaded.cutoff == 5.0
    assert not loaded.training
    assert loaded.config["training_data_stats"] == {
        "mean_energy_per_atom": -3.1,
        "count": 7,
    }


def test_round_trip_same_outputs(model, saved, graph):
    loaded = load_model(saved)
    expected = model(graph)
    outputs = loaded(graph)
    for key in (keys.ENERGY, keys.ENERGIES, keys.FORCES, keys.STRESS):
        torch.testing.assert_close(outputs[key], expected[key], rtol=0, atol=0)
    # the saved per-type scales and shifts are really used
    assert not torch.allclose(
        outputs[keys.ENERGY], _model(model_dtype="float64")(graph)[keys.ENERGY]
    )


def test_metadata(saved):
    header = _header(saved)
    assert header["format"] == FORMAT_TAG == "pes_calc.model"
    assert header["format_version"] == str(FORMAT_VERSION)
    metadata = read_metadata(saved)
    assert metadata == json.loads(header["metadata"])
    assert metadata["architecture"] == "soap_bpnn"
    assert metadata["species"] == ["Cu", "Ag"]
    assert metadata["cutoff"] == 5.0
    assert metadata["dtype"] == "float64"
    assert metadata["units"] == {"energy": "eV", "length": "Å"}
    assert metadata["do_derivatives"] is True
    assert metadata["model"]["soap"]["max_angular"] == 2
    assert metadata["model"]["soap"]["max_radial"] == 2
    assert metadata["model"]["per_type_energy_shifts"] == [-3.5, -2.25]


def test_dtype_follows_the_weights_not_the_build_config(tmp_path, graph):
    model = _model().double().eval()  # built float32, converted afterwards
    path = tmp_path / "converted.safetensors"
    save_model(model, path)
    assert read_metadata(path)["dtype"] == "float64"
    loaded = load_model(path)
    assert all(t.dtype == torch.float64 for t in loaded.state_dict().values())
    torch.testing.assert_close(
        loaded(graph)[keys.FORCES], model(graph)[keys.FORCES], rtol=0, atol=0
    )


def test_float32_round_trip(tmp_path, graph):
    model = _model().eval()
    path = tmp_path / "float32.safetensors"
    save_model(model, path)
    assert read_metadata(path)["dtype"] == "float32"
    loaded = load_model(path)
    assert loaded.per_type_energy_scales.dtype == torch.float32
    graph32 = graph._replace(
        positions=graph.positions.float(),
        cell=graph.cell.float(),
        edge_cell_shifts=graph.edge_cell_shifts.float(),
    )
    torch.testing.assert_close(
        loaded(graph32)[keys.ENERGY], model(graph32)[keys.ENERGY], rtol=0, atol=0
    )


def test_energy_only_model_round_trip(tmp_path, graph):
    model = _model(do_derivatives=False)
    path = tmp_path / "energy_only.safetensors"
    save_model(model, path)
    loaded = load_model(path)
    assert loaded.do_derivatives is False
    graph32 = graph._replace(
        positions=graph.positions.float(),
        cell=graph.cell.float(),
        edge_cell_shifts=graph.edge_cell_shifts.float(),
    )
    outputs = loaded(graph32)
    assert keys.FORCES not in outputs and keys.STRESS not in outputs
    torch.testing.assert_close(outputs[keys.ENERGY], model.eval()(graph32)[keys.ENERGY])


def test_loading_never_unpickles(saved, graph, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a model file must never be unpickled")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    loaded = load_model(saved)
    assert torch.isfinite(loaded(graph)[keys.ENERGY]).all()


# ---- broken files ----------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="no model file at"):
        load_model(tmp_path / "nothing.safetensors")


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(ModelFileError, match="no model file at"):
        load_model(tmp_path)


@pytest.mark.parametrize("fraction", [0.5, 0.999])
def test_truncated_file(saved, tmp_path, fraction):
    data = saved.read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ModelFileError, match="corrupted or truncated"):
        load_model(path)


@pytest.mark.parametrize("size", [0, 5, 4096])
def test_random_bytes(tmp_path, size):
    path = tmp_path / "random.safetensors"
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        load_model(path)


def test_pickle_file_is_rejected(tmp_path, model):
    path = tmp_path / "model.safetensors"
    torch.save(model.state_dict(), path)
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        load_model(path)


def test_foreign_safetensors(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(ModelFileError, match="not a pes_calc model"):
        load_model(path)


def test_foreign_safetensors_with_other_metadata(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match="format tag 'pt'"):
        load_model(path)


def test_newer_format_version(tmp_path, saved):
    path = tmp_path / "future.safetensors"
    header = _header(saved)
    save_file(
        load_file(str(saved)),
        str(path),
        metadata={**header, "format": "pes_calc.model", "format_version": "99"},
    )
    with pytest.raises(ModelFileError, match="version 99, newer than"):
        load_model(path)


@pytest.mark.parametrize("version", ["0", "one"])
def test_invalid_format_version(tmp_path, saved, version):
    path = tmp_path / "invalid.safetensors"
    save_file(
        load_file(str(saved)),
        str(path),
        metadata={**_header(saved), "format_version": version},
    )
    with pytest.raises(ModelFileError, match="invalid format version"):
        load_model(path)


@pytest.mark.parametrize("metadata", [None, "{not json"])
def test_damaged_metadata(tmp_path, saved, metadata):
    header = _header(saved)
    if metadata is None:
        del header["metadata"]
    else:
        header["metadata"] = metadata
    path = tmp_path / "damaged.safetensors"
    save_file(load_file(str(saved)), str(path), metadata=header)
    with pytest.raises(ModelFileError, match="damaged metadata"):
        load_model(path)


def _rewrite(saved, path, tensors=None, metadata_changes=None):
    header = _header(saved)
    metadata = json.loads(header["metadata"])
    for change in metadata_changes or []:
        change(metadata)
    header["metadata"] = json.dumps(metadata)
    tensors = load_file(str(saved)) if tensors is None else tensors
    save_file(tensors, str(path), metadata=header)
    return path


def test_weights_missing_a_tensor(tmp_path, saved):
    tensors = load_file(str(saved))
    del tensors["architecture.last_layer.weight"]
    path = _rewrite(saved, tmp_path / "missing.safetensors", tensors)
    with pytest.raises(ModelFileError, match=r"do not match.*last_layer\.weight"):
        load_model(path)


def test_weights_with_an_extra_tensor(tmp_path, saved):
    tensors = load_file(str(saved))
    tensors["architecture.extra"] = torch.zeros(2, dtype=torch.float64)
    path = _rewrite(saved, tmp_path / "extra.safetensors", tensors)
    with pytest.raises(ModelFileError, match=r"do not match.*architecture\.extra"):
        load_model(path)


def test_weights_of_another_size(tmp_path, saved):
    # the metadata describes a larger basis than the weights were trained with
    def bigger(metadata):
        metadata["model"]["soap"]["max_radial"] = 3

    path = _rewrite(saved, tmp_path / "shape.safetensors", metadata_changes=[bigger])
    with pytest.raises(ModelFileError, match="do not match"):
        load_model(path)


def test_weights_for_other_species(tmp_path):
    saved = tmp_path / "two_species.safetensors"
    save_model(_model(), saved)

    def three_species(metadata):
        metadata["species"] = ["Cu", "Ag", "Au"]

    path = _rewrite(
        saved, tmp_path / "species.safetensors", metadata_changes=[three_species]
    )
    with pytest.raises(ModelFileError, match="do not match"):
        load_model(path)


@pytest.mark.parametrize(
    "change",
    [
        lambda metadata: metadata.pop("architecture"),
        lambda metadata: metadata.update(architecture="mace"),
        lambda metadata: metadata["model"].update(unknown_hyper=1),
        lambda metadata: metadata.update(species=["Cu", "Ag", "Au"]),  # 2 shifts
    ],
    ids=["no_architecture", "unknown_architecture", "unknown_hyper", "species"],
)
def test_metadata_that_describes_no_model(tmp_path, saved, change):
    path = _rewrite(saved, tmp_path / "bad.safetensors", metadata_changes=[change])
    with pytest.raises(ModelFileError, match="does not describe a model"):
        load_model(path)


def test_a_deep_copied_nequip_round_trips(tmp_path):
    """Deep copies of e3nn's generated tensor products gain constant buffers; the
    file stores weights only, so the copy loads as a fresh build would."""
    import copy

    model = build_model(
        "nequip",
        ["Cu"],
        r_max=4.0,
        l_max=2,
        num_layers=4,
        num_features=8,
        model_dtype="float64",
    )
    copied = copy.deepcopy(model)
    assert any("_tensor_constant" in name for name in copied.state_dict())
    save_model(copied, tmp_path / "copy.safetensors")
    loaded = load_model(tmp_path / "copy.safetensors")
    atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=0)
    graph = atoms_to_graph(atoms, ["Cu"], 4.0)
    expected, got = model(graph), loaded(graph)
    for name in ("energy", "forces", "stress"):
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


def test_saved_files_get_the_users_umask(tmp_path, model):
    import os

    save_model(model, tmp_path / "m.safetensors")
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
