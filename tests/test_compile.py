"""Tests of `pes_calc.compile`'s AOTInductor packages (TorchScript artefacts are
tested with the calculator, the contract and LLPR).

One tiny float64 SOAP-BPNN wrapped in LLPR is compiled once for the module (about a
minute): the compiled graph must equal eager on structures of other sizes, cells and
numbers of structures than it was traced on, and everything it was not compiled for
must fall back to eager.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zipfile

import ase
import ase.build
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import emt_structures

from pes_calc import PESCalculator, build_model, evaluate, keys, save_model
from pes_calc import artefacts as artefacts_module
from pes_calc import compile as compile_module
from pes_calc.artefacts import (
    AOTInductorPotential,
    load_artefact,
    read_artefact_metadata,
)
from pes_calc.cli import main
from pes_calc.compile import compile_model, mode_for
from pes_calc.io import ModelFileError
from pes_calc.llpr import LLPR
from pes_calc.neighbors import atoms_to_graph
from pes_calc.train.data import LabelKeys, extract_labels, labelled_graphs
from pes_calc.train.llpr import wrap

# a fallback to eager warns: a test that meant the compiled code must not pass on it
pytestmark = pytest.mark.filterwarnings("error:.*eager model instead:UserWarning")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PES_CALC_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def llpr() -> LLPR:
    model = build_model(
        "soap_bpnn",
        ["Cu", "Ag"],
        model_dtype="float64",
        seed=0,
        soap={"max_angular": 2, "max_radial": 2},
        bpnn={"num_hidden_layers": 1, "num_neurons_per_layer": 6},
    )
    structures = emt_structures(6, seed=0)
    labels = extract_labels(structures, LabelKeys())
    graphs = labelled_graphs(structures, labels, model.species, model.cutoff)
    return wrap(model, 4, graphs[:4], graphs[4:], batch_size=4, seed=1)


@pytest.fixture(scope="module")
def package(llpr, cache, tmp_path_factory):
    path = tmp_path_factory.mktemp("aoti") / "model.pt2"
    compile_model(llpr, path, mode="aotinductor")
    return path


def structures() -> list[ase.Atoms]:
    """Sizes, cells and periodicities the package was not traced on."""
    rng = np.random.default_rng(5)
    triclinic = ase.build.bulk("Cu", "fcc", a=3.65, cubic=True) * (2, 2, 1)
    triclinic.cell = triclinic.cell.array + rng.uniform(-0.3, 0.3, (3, 3))
    cluster = ase.Atoms(
        "Cu4Ag", positions=[[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0], [0, 0, 2.5], [2, 2, 2]]
    )
    slab = ase.build.fcc111("Cu", size=(2, 2, 3), vacuum=5.0, a=3.61)
    slab.pbc = (True, True, False)
    primitive = ase.build.bulk("Ag", "fcc", a=4.0)  # one atom: edges to its images
    result = [triclinic, cluster, slab, primitive]
    for atoms in result:
        symbols = rng.choice(["Cu", "Ag"], size=len(atoms))
        atoms.set_chemical_symbols(list(symbols))
        atoms.positions += rng.normal(0.0, 0.05, atoms.positions.shape)
    return result


def test_package_holds_its_metadata(package, llpr):
    metadata = read_artefact_metadata(package)
    assert metadata["artefact"] == "aotinductor"
    assert metadata["llpr"] == llpr.config["llpr"]
    assert metadata["compiled_outputs"] == [
        keys.ENERGY,
        keys.ENERGIES,
        keys.FORCES,
        keys.STRESS,
        keys.ENERGY_UNCERTAINTY,
        keys.ENERGIES_UNCERTAINTY,
        keys.ENERGY_ENSEMBLE,
    ]
    loaded, _ = load_artefact(package)
    assert isinstance(loaded, AOTInductorPotential)


@pytest.mark.parametrize("index", range(4))
def test_compiled_equals_eager(package, llpr, index):
    atoms = structures()[index]
    compiled, _ = load_artefact(package)
    graph = atoms_to_graph(atoms, llpr.species, llpr.cutoff)
    periodic = bool(atoms.pbc.all())
    expected = llpr(graph, True, periodic)
    got = compiled(graph, True, periodic)
    assert (keys.STRESS in got) == periodic
    for name in compiled.output_names:
        if name in expected:
            np.testing.assert_allclose(
                got[name].detach().numpy(),
                expected[name].detach().numpy(),
                rtol=1e-9,
                atol=1e-10,
                err_msg=name,
            )


def test_batches_of_structures(package, llpr):
    """A dynamic number of structures: batched evaluation through the package."""
    eager = evaluate(llpr, structures(), batch_size=3, device="cpu")
    compiled = evaluate(package, structures(), batch_size=3, device="cpu")
    for got, expected in zip(compiled, eager, strict=True):
        assert set(got) == set(expected)
        for name, value in expected.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-9, atol=1e-10)


def test_calculator_md_and_ensemble_forces(package, llpr):
    """MD through the calculator; ensemble forces come from the eager model."""
    from ase.md.verlet import VelocityVerlet

    energies = {}
    for name, model in (("eager", llpr), ("compiled", package)):
        atoms = structures()[0]
        atoms.calc = PESCalculator(model, device="cpu")
        kind = LLPR if name == "eager" else AOTInductorPotential
        assert isinstance(atoms.calc.model, kind)
        VelocityVerlet(atoms, timestep=1.0 * ase.units.fs).run(5)
        energies[name] = atoms.get_potential_energy()
        forces_uncertainty = atoms.calc.get_property("forces_uncertainty", atoms)
        energies[name + " σF"] = forces_uncertainty
    np.testing.assert_allclose(energies["compiled"], energies["eager"], rtol=1e-10)
    np.testing.assert_allclose(energies["compiled σF"], energies["eager σF"], rtol=1e-8)


def test_another_dtype_runs_the_eager_model(package, llpr):
    """A float64 package asked for float32: the calculator's converted copy runs
    its eager model (the compiled code takes float64 only), with a warning."""
    atoms = structures()[0]
    atoms.calc = PESCalculator(package, device="cpu", dtype=torch.float32)
    with pytest.warns(UserWarning, match="compiled for"):
        forces = atoms.get_forces()
    expected = atoms.copy()
    expected.calc = PESCalculator(llpr, device="cpu", dtype=torch.float32)
    np.testing.assert_allclose(forces, expected.get_forces(), rtol=1e-6, atol=1e-6)


def test_a_second_compile_comes_from_the_cache(package, llpr, tmp_path, monkeypatch):
    def fail(*args):
        raise AssertionError("compiled again instead of using the cache")

    monkeypatch.setattr(compile_module, "_export_and_compile", fail)
    compile_model(llpr, tmp_path / "again.pt2", mode="aotinductor")
    assert (tmp_path / "again.pt2").read_bytes() == package.read_bytes()
    # the CLI too, from the .safetensors file
    save_model(llpr, tmp_path / "model.safetensors")
    threads = torch.get_num_threads()
    result = CliRunner().invoke(
        main,
        [
            "compile",
            str(tmp_path / "model.safetensors"),
            "-o",
            str(tmp_path / "cli.pt2"),
            "--mode",
            "aotinductor",
            "--threads",
            str(threads),
        ],
    )
    assert result.exit_code == 0, result.output
    info = CliRunner().invoke(main, ["info", str(tmp_path / "cli.pt2")])
    assert "aotinductor" in info.output
    # without -o or --mode: an AOTInductor package beside the model, MODEL.pt2
    result = CliRunner().invoke(
        main,
        ["compile", str(tmp_path / "model.safetensors"), "--threads", str(threads)],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "model.pt2").read_bytes() == package.read_bytes()
    # other weights, or another thread count, are another key: that would compile
    other = build_model("soap_bpnn", ["Cu"], soap={"max_angular": 2, "max_radial": 2})
    with pytest.raises(AssertionError, match="compiled again"):
        compile_model(other, tmp_path / "other.pt2", mode="aotinductor")
    try:
        torch.set_num_threads(threads + 1)
        with pytest.raises(AssertionError, match="compiled again"):
            compile_model(llpr, tmp_path / "threads.pt2", mode="aotinductor")
    finally:
        torch.set_num_threads(threads)


def test_broken_compiled_code_falls_back_to_eager(package, llpr, monkeypatch):
    def broken(path):
        raise RuntimeError("undefined symbol in the shared library")

    monkeypatch.setattr(torch._inductor, "aoti_load_package", broken)
    with pytest.warns(UserWarning, match="eager model instead"):
        model, _ = load_artefact(package)
    assert isinstance(model, LLPR)


def test_a_package_on_a_cpu_without_its_instructions_runs_eager(
    package, llpr, monkeypatch
):
    """Compiled loops with instructions the CPU lacks would kill the process, so
    the package records them and another CPU runs the eager model it carries."""
    metadata = read_artefact_metadata(package)
    recorded = metadata["cpu_features"]
    assert recorded["machine"] and isinstance(recorded["flags"], list)

    def must_not_load(path):
        raise AssertionError("the compiled code was loaded")

    monkeypatch.setattr(torch._inductor, "aoti_load_package", must_not_load)
    monkeypatch.setattr(artefacts_module, "x86_isa_checker", lambda: [])
    if recorded["flags"] and recorded["machine"] in ("x86_64", "AMD64"):
        with pytest.warns(UserWarning, match="CPU features this machine lacks"):
            model, _ = load_artefact(package)
        assert isinstance(model, LLPR)
    monkeypatch.setattr(artefacts_module.platform, "machine", lambda: "riscv64")
    with pytest.warns(UserWarning, match=f"a {recorded['machine']} CPU, not riscv64"):
        model, _ = load_artefact(package)
    assert isinstance(model, LLPR)
    # and the eager model gives the eager numbers
    atoms = structures()[0]
    with pytest.warns(UserWarning, match="riscv64"):
        atoms.calc = PESCalculator(package, device="cpu")
    forces = atoms.get_forces()
    expected = atoms.copy()
    expected.calc = PESCalculator(llpr, device="cpu")
    np.testing.assert_allclose(forces, expected.get_forces(), rtol=1e-12, atol=1e-12)


def test_disagreeing_compiled_code_falls_back_to_eager(package, monkeypatch):
    real = torch._inductor.aoti_load_package

    def off_by_a_bit(path):
        compiled = real(path)
        return lambda *args: tuple(value * 1.001 for value in compiled(*args))

    monkeypatch.setattr(torch._inductor, "aoti_load_package", off_by_a_bit)
    with pytest.warns(UserWarning, match="differs from eager"):
        model, _ = load_artefact(package)
    assert isinstance(model, LLPR)


NO_JIT_WARNINGS = """
import sys, warnings
warnings.filterwarnings("error", message=r"`torch\\.jit", category=DeprecationWarning)
import ase.build
import pes_calc
from pes_calc import PESCalculator
from pes_calc.cli import main
for path in sys.argv[1:]:
    atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)  # thread counts
        atoms.calc = PESCalculator(path, device="cpu")
    atoms.get_forces(), atoms.get_stress()
print("ok")
"""


def test_torchscript_deprecations_never_reach_the_other_paths(package, llpr, tmp_path):
    """torch 2.13 deprecates torch.jit: a user of .safetensors and .pt2 files (and
    of the CLI module) gets none of its warnings, in a fresh process."""
    save_model(llpr, tmp_path / "model.safetensors")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            NO_JIT_WARNINGS,
            str(tmp_path / "model.safetensors"),
            str(package),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


LOADS_WITHOUT_A_COMPILER = """
import shutil, sys
assert shutil.which("g++") is None and shutil.which("cc") is None
import ase.build
from pes_calc import PESCalculator
atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
atoms.calc = PESCalculator(sys.argv[1], device="cpu")
atoms.get_forces()
print(type(atoms.calc.model).__name__)
"""


def test_a_package_loads_and_runs_compiled_without_a_compiler(package):
    """Moving a .pt2 to a machine without g++ keeps the compiled code."""
    result = subprocess.run(
        [sys.executable, "-c", LOADS_WITHOUT_A_COMPILER, str(package)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PATH": "/nonexistent", "CXX": "", "CC": ""},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "AOTInductorPotential"


def test_unknown_mode(llpr, tmp_path):
    with pytest.raises(ValueError, match="unknown compile mode"):
        compile_model(llpr, tmp_path / "x", mode="tensorrt")


def test_the_suffix_names_the_artefact():
    assert mode_for("m.pt2") == "aotinductor"
    assert mode_for("m.pt") == "torchscript"
    assert mode_for("m.bin", "torchscript") == "torchscript"
    assert mode_for("m.pt", "torchscript") == "torchscript"
    with pytest.raises(ValueError, match="name the artefact .pt2"):
        mode_for("m.bin")
    with pytest.raises(ValueError, match="a .pt file is a torchscript artefact"):
        mode_for("m.pt", "aotinductor")
    with pytest.raises(ValueError, match="a .pt2 file is a aotinductor artefact"):
        mode_for("m.pt2", "torchscript")


def test_cli_compile_picks_torchscript_from_the_name_or_mode(llpr, tmp_path):
    save_model(llpr, tmp_path / "model.safetensors")
    runner = CliRunner()
    result = runner.invoke(
        main,
        ["compile", str(tmp_path / "model.safetensors"), "-o", str(tmp_path / "s.pt")],
    )
    assert result.exit_code == 0, result.output
    assert "(torchscript" in result.output
    result = runner.invoke(
        main, ["compile", str(tmp_path / "model.safetensors"), "--mode", "torchscript"]
    )
    assert result.exit_code == 0, result.output
    _, metadata = load_artefact(tmp_path / "model.pt")
    assert metadata["artefact"] == "torchscript"
    # a suffix that disagrees with --mode, or names nothing: one line, nothing written
    for name, options in (("x.pt", ["--mode", "aotinductor"]), ("x.model", [])):
        result = runner.invoke(
            main,
            [
                "compile",
                str(tmp_path / "model.safetensors"),
                "-o",
                str(tmp_path / name),
                *options,
            ],
        )
        assert result.exit_code != 0
        assert "Error" in result.output and "Traceback" not in result.output
        assert not (tmp_path / name).exists()


def test_package_records_its_threads_and_warns_when_run_with_others(package, llpr):
    threads = read_artefact_metadata(package)["cpu_threads"]
    assert threads == torch.get_num_threads()
    other = 2 if threads == 1 else 1
    try:
        torch.set_num_threads(other)
        with pytest.warns(UserWarning, match=f"compiled for {threads} CPU thread"):
            calc = PESCalculator(package)
    finally:
        torch.set_num_threads(threads)
    # still the compiled code, only slower than it could be
    assert isinstance(calc.model, AOTInductorPotential)


# a process that imports pes_calc (not its architectures) and runs a TorchScript file
FRESH_PROCESS = """
import json, sys
import ase.build
import pes_calc

imported_before = sys.argv[2] in sys.modules
atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
atoms.rattle(0.1, seed=1)
atoms.calc = pes_calc.PESCalculator(sys.argv[1], device="cpu")
force = float(abs(atoms.get_forces()).max())
print(json.dumps({"before": imported_before, "force": force}))
"""


@pytest.mark.parametrize(
    "architecture, hypers",
    [
        ("nequip", {"l_max": 1, "num_layers": 1, "num_features": 4}),
        ("allegro", {"l_max": 1, "num_layers": 1, "num_tensor_features": 2}),
    ],
)
def test_torchscript_files_with_our_operators_load_in_a_fresh_process(
    architecture, hypers, tmp_path
):
    """The module that registers the architecture's torch.ops.pes_calc operators
    (REQUIRED_IMPORTS) is loaded with pes_calc itself (every architecture is, at
    import), so a file loads in a process that imported nothing else."""
    (module,) = compile_module.REQUIRED_IMPORTS[architecture]
    path = tmp_path / f"{architecture}.pt"
    compile_model(build_model(architecture, ["Cu"], seed=0, **hypers), path)
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(path), module],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["before"]  # registered by `import pes_calc` alone
    assert report["force"] > 0


@pytest.mark.parametrize(
    "architecture, hypers",
    [
        ("nequip", {"l_max": 2, "num_layers": 2, "num_features": 4}),
        ("allegro", {"l_max": 2, "num_layers": 2, "num_tensor_features": 4}),
    ],
)
def test_export_formulations_give_the_eager_numbers(architecture, hypers):
    """What `prepare_for_export` switches (NequIP: no edge chunks; Allegro: contraction
    by multiply-and-sum) changes the arithmetic's order, not the results."""
    model = build_model(
        architecture, ["Cu", "Ag"], model_dtype="float64", seed=0, **hypers
    )
    atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 2, 2)
    atoms.symbols[::3] = "Ag"
    atoms.rattle(0.1, seed=0)
    graph = atoms_to_graph(atoms, model.species, model.cutoff, dtype=torch.float64)
    for module in model.modules():  # chunks small enough to matter here
        if hasattr(module, "edge_chunk"):
            module.edge_chunk = 100
    expected = model(graph)
    prepared = [m for m in model.modules() if hasattr(m, "prepare_for_export")]
    assert prepared
    for module in prepared:
        module.prepare_for_export()
    result = model(graph)
    for key in (keys.ENERGY, keys.FORCES, keys.STRESS):
        torch.testing.assert_close(result[key], expected[key], rtol=1e-10, atol=1e-12)


def test_a_damaged_package_is_refused(package, tmp_path):
    """A flipped byte inside the compiled code fails the archive's SHA-256."""
    with zipfile.ZipFile(package) as archive:
        largest = max(archive.infolist(), key=lambda info: info.compress_size)
    data = bytearray(package.read_bytes())
    (name_length, extra_length) = struct.unpack(
        "<HH", data[largest.header_offset + 26 : largest.header_offset + 30]
    )
    start = largest.header_offset + 30 + name_length + extra_length
    data[start + largest.compress_size // 2] ^= 0x01
    damaged = tmp_path / "damaged.pt2"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="do not match the SHA-256"):
        load_artefact(damaged)
