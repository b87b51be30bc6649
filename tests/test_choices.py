"""dtype and device spellings, everywhere they are taken."""

import ase.build
import numpy as np
import pytest
import torch

from pes_calc import PESCalculator, build_model, evaluate
from pes_calc.choices import as_device, as_dtype
from pes_calc.neighbors import atoms_to_graph


@pytest.mark.parametrize(
    "value, expected",
    [
        ("float64", torch.float64),
        ("float32", torch.float32),
        (torch.float64, torch.float64),
        ("torch.float32", torch.float32),
        ("double", torch.float64),
        (None, None),
    ],
)
def test_dtype_spellings(value, expected):
    assert as_dtype(value) == expected


@pytest.mark.parametrize("value", ["float16", "f64", torch.int64, torch.float16, 64])
def test_other_dtypes_list_the_choices(value):
    with pytest.raises(ValueError, match="'float32' or 'float64'"):
        as_dtype(value)


@pytest.mark.parametrize("value", ["gpu", "cuda:x", 0.5])
def test_bad_devices_list_the_choices(value):
    with pytest.raises(ValueError, match="'cpu', 'cuda', 'cuda:N'"):
        as_device(value)


def test_strings_work_in_the_public_functions(tmp_path):
    atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=0)
    model = build_model(
        "soap_bpnn",
        ["Cu"],
        model_dtype=torch.float64,
        seed=0,
        soap={"max_angular": 2, "max_radial": 2},
    )
    assert model.config["model"]["model_dtype"] == "float64"
    by_object = PESCalculator(model, device=torch.device("cpu"), dtype=torch.float32)
    by_name = PESCalculator(model, device="cpu", dtype="float32")
    assert by_name.dtype == by_object.dtype == torch.float32
    atoms.calc = by_name
    energy = atoms.get_potential_energy()
    (result,) = evaluate(model, [atoms], device="cpu", dtype="float32")
    assert np.isclose(result["energy"], energy, rtol=1e-6)
    graph = atoms_to_graph(atoms, ["Cu"], 3.0, dtype="float32", device="cpu")
    assert graph.positions.dtype == torch.float32
    with pytest.raises(ValueError, match="'float32' or 'float64'"):
        PESCalculator(model, dtype="half")


def test_compile_takes_names(tmp_path):
    from pes_calc.artefacts import read_artefact_metadata
    from pes_calc.compile import compile_model

    model = build_model(
        "soap_bpnn", ["Cu"], seed=0, soap={"max_angular": 2, "max_radial": 2}
    )
    compile_model(model, tmp_path / "m.pt", dtype="float64", device="cpu")
    assert read_artefact_metadata(tmp_path / "m.pt")["dtype"] == "float64"
