"""Damaged model files: a flipped byte anywhere, a truncation or a forged header
ends in `ModelFileError`, never in a number or another exception."""

import json
import struct
import warnings

import numpy as np
import pytest
import torch

from pes_calc import build_model, load_model, save_model
from pes_calc.artefacts import load_artefact
from pes_calc.compile import compile_model
from pes_calc.io import ModelFileError, is_checked


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = build_model(
        "soap_bpnn",
        ["Cu", "Ag"],
        model_dtype="float64",
        seed=0,
        soap={"max_angular": 2, "max_radial": 2},
        bpnn={"num_hidden_layers": 1, "num_neurons_per_layer": 6},
    )
    path = tmp_path_factory.mktemp("integrity") / "model.safetensors"
    save_model(model, path)
    return path


def layout(path):
    """(header length, header JSON, start of the data) of a safetensors file."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return length, json.loads(data[8 : 8 + length]), 8 + length


def flipped(path, position, out):
    data = bytearray(path.read_bytes())
    data[position] ^= 0x10
    out.write_bytes(bytes(data))
    return out


def test_saved_files_carry_digests(saved):
    assert is_checked(saved)
    _, header, _ = layout(saved)
    digests = json.loads(header["__metadata__"]["digests"])
    assert set(digests["tensors"]) == {k for k in header if k != "__metadata__"}


def test_a_flipped_byte_in_each_tensor_names_it(saved, tmp_path):
    _, header, start = layout(saved)
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        if begin == end:
            continue
        damaged = flipped(
            saved, start + (begin + end) // 2, tmp_path / "damaged.safetensors"
        )
        with pytest.raises(ModelFileError, match=f"tensor '{name}'"):
            load_model(damaged)


def test_changed_metadata_is_caught(saved, tmp_path):
    # same length, valid JSON, another cutoff: only the digest can tell
    data = saved.read_bytes()
    changed = data.replace(b'\\"radius\\": 5.0', b'\\"radius\\": 4.0', 1)
    assert changed != data
    (tmp_path / "changed.safetensors").write_bytes(changed)
    with pytest.raises(ModelFileError, match="metadata does not match the digest"):
        load_model(tmp_path / "changed.safetensors")


def test_files_before_digests_load_unchecked(saved, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(saved), framework="pt") as handle:
        header = dict(handle.metadata())
    del header["digests"]
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(saved)), str(old), metadata=header)
    assert not is_checked(old)
    with pytest.warns(UserWarning, match="cannot be checked"):
        model = load_model(old)
    reference = load_model(saved).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


def test_hundreds_of_mutations_end_in_model_file_error(saved, tmp_path):
    """Single-byte flips anywhere, truncations, a forged header length: each load
    either fails with ModelFileError or (a flip that changes nothing read) gives
    exactly the original weights."""
    original = {k: v.clone() for k, v in load_model(saved).state_dict().items()}
    data = saved.read_bytes()
    rng = np.random.default_rng(0)
    mutants = []
    for position in rng.choice(len(data), size=240, replace=False):
        mutant = bytearray(data)
        mutant[position] ^= 1 << int(rng.integers(8))
        mutants.append(bytes(mutant))
    for length in rng.choice(len(data), size=40, replace=False):
        mutants.append(data[:length])
    for value in (0, 7, len(data), 2**40):
        mutants.append(struct.pack("<Q", value) + data[8:])
    outcomes = {"error": 0, "unchanged": 0}
    path = tmp_path / "mutant.safetensors"
    for mutant in mutants:
        path.write_bytes(mutant)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = load_model(path)
        except ModelFileError:
            outcomes["error"] += 1
            continue
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in original.items())
        outcomes["unchanged"] += 1
    assert outcomes["error"] >= 0.9 * len(mutants), outcomes


@pytest.fixture(scope="module")
def archive(saved, tmp_path_factory):
    path = tmp_path_factory.mktemp("archive") / "model.pt"
    compile_model(load_model(saved), path, mode="torchscript")
    return path


def test_a_damaged_byte_anywhere_in_an_archive_is_refused(archive, tmp_path):
    """Random bytes, and every byte of the zip end records and the seal: zip
    headers and padding are covered too, not only the members' CRC-32s."""
    size = archive.stat().st_size
    rng = np.random.default_rng(1)
    positions = set(rng.choice(size, size=150, replace=False).tolist())
    positions |= set(range(size - 200, size))  # directory end, zip64 records, seal
    for position in sorted(positions):
        damaged = flipped(archive, position, tmp_path / "damaged.pt")
        try:
            load_artefact(damaged)
        except ModelFileError:
            continue
        except Exception as error:  # noqa: BLE001
            pytest.fail(f"byte {position}: {type(error).__name__}: {error}")
        pytest.fail(f"byte {position} of {size} was damaged and the archive loaded")


def test_a_cut_short_archive_is_refused(archive, tmp_path):
    data = archive.read_bytes()
    for length in (len(data) - 1, len(data) - 64, len(data) // 2, 10, 0):
        short = tmp_path / "short.pt"
        short.write_bytes(data[:length])
        with pytest.raises(ModelFileError):
            load_artefact(short)


def test_archives_before_seals_load_with_crc_checks(archive, tmp_path):
    """An archive without the seal whose metadata does not claim one (compiled by
    an earlier pes_calc) loads with a warning; its members' CRC-32s are checked."""
    import zipfile

    unsealed = tmp_path / "unsealed.pt"
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(unsealed, "w") as copy:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("pes_calc_metadata.json"):
                metadata = json.loads(data)
                del metadata["sealed"]
                data = json.dumps(metadata).encode()
            copy.writestr(info, data)
    with pytest.warns(UserWarning, match="before pes_calc sealed archives"):
        model, metadata = load_artefact(unsealed)
    assert "sealed" not in metadata
    # the same archive whose metadata claims a seal that is not there is damage
    stripped = tmp_path / "stripped.pt"
    data = archive.read_bytes()
    stripped.write_bytes(data[: -72 - 2] + b"\x00\x00")
    with pytest.raises(ModelFileError, match="missing or damaged"):
        load_artefact(stripped)


def test_malformed_structures_end_in_clear_errors(saved):
    """NaN or infinite positions, broken cells, unknown elements, empty cells:
    ValueError (UnknownSpeciesError is one) or ASE's PropertyNotImplementedError,
    never a number or another exception."""
    import ase
    import ase.build
    from ase.calculators.calculator import PropertyNotImplementedError

    from pes_calc import PESCalculator

    calculator = PESCalculator(saved, device="cpu")
    good = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    rng = np.random.default_rng(2)
    cases = []
    for _ in range(30):
        atoms = good.copy()
        atoms.positions[rng.integers(len(atoms)), rng.integers(3)] = rng.choice(
            [np.nan, np.inf, -np.inf]
        )
        cases.append(atoms)
    for _ in range(10):
        atoms = good.copy()
        atoms.cell[rng.integers(3)] = 0.0  # a periodic direction without a vector
        cases.append(atoms)
    for value in (np.nan, np.inf):
        atoms = good.copy()
        atoms.cell[0, 0] = value
        cases.append(atoms)
    flat = good.copy()
    flat.cell[2] = flat.cell[0]  # periodic everywhere but no volume
    cases.append(flat)
    cases.append(ase.Atoms("CuAu", positions=[[0, 0, 0], [2, 0, 0]]))  # Au unknown
    cases.append(ase.Atoms("Xe", positions=[[0, 0, 0]], cell=[5, 5, 5], pbc=True))
    molecule = ase.Atoms("Cu2", positions=[[0, 0, 0], [2.3, 0, 0]])
    for atoms in cases:
        atoms.calc = calculator
        with pytest.raises((ValueError, PropertyNotImplementedError)):
            atoms.get_forces()
    molecule.calc = calculator  # no cell: energy and forces, but no stress
    assert np.isfinite(molecule.get_forces()).all()
    with pytest.raises(PropertyNotImplementedError):
        molecule.get_stress()
