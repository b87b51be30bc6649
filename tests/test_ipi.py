"""`pes_calc.ipi` and `pes-calc ipi`: the i-PI socket client.

The protocol, units and virial sign are checked against ASE's own socket server
(in-process, fast); the whole path against i-PI's server running a 2-bead
path-integral NVT simulation served by two clients.
"""

import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import ase
import ase.build
import ase.io
import numpy as np
import pytest
from ase import units
from ase.calculators.socketio import SocketIOCalculator
from click.testing import CliRunner

from pes_calc import PESCalculator, build_model, save_model
from pes_calc.cli import main
from pes_calc.ipi import (
    IPIError,
    nearest_images,
    parse_address,
    serve,
    unix_socket_path,
)
from pes_calc.neighbors import UnknownSpeciesError

TINY = {"soap": {"max_angular": 2, "max_radial": 2}}


@pytest.fixture(scope="module")
def model():
    """Tiny untrained Cu model, float64; energies ×100 for forces of ~0.5 eV/Å."""
    return build_model(
        "soap_bpnn",
        ["Cu"],
        **TINY,
        seed=0,
        model_dtype="float64",
        per_type_energy_scales=100.0,
    )


def fcc(repeat=(2, 1, 1)) -> ase.Atoms:
    """Rattled cubic fcc Cu; atoms at the origin get negative coordinates."""
    atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True) * repeat
    atoms.rattle(0.05, seed=1)
    return atoms


def unique_name() -> str:
    """A unix socket name no parallel test run shares."""
    return f"pescalc-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_client(*args, **kwargs):
    """`serve` in a daemon thread; returns the thread and a dict for its result."""
    out: dict = {}

    def run():
        try:
            out["summary"] = serve(*args, **kwargs)
        except BaseException as error:  # reported by the test
            out["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


@pytest.mark.parametrize(
    "text, expected",
    [
        ("localhost:31415", ("localhost", 31415)),
        ("10.0.0.2:4000", ("10.0.0.2", 4000)),
        ("node17", ("node17", 31415)),
        (" host:1 ", ("host", 1)),
    ],
)
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("localhost:port", "the port 'port' is not a whole number"),
        ("localhost:70000", "port 70000 is not in 1-65535"),
        ("localhost:0", "port 0 is not in 1-65535"),
        (":31415", "expected HOST:PORT"),
        ("", "expected HOST:PORT"),
        ("my host:1", "expected HOST:PORT"),
    ],
)
def test_parse_address_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_address(text)


def test_unix_socket_path():
    # where i-PI (default sockets_prefix) and ASE put unix socket NAME
    assert unix_socket_path("cu") == "/tmp/ipi_cu"
    assert unix_socket_path("/scratch/ipi_cu") == "/scratch/ipi_cu"
    with pytest.raises(ValueError, match="empty"):
        unix_socket_path("")


def test_nearest_images_undo_wrapping():
    atoms = fcc()
    cell = atoms.cell.array
    moved = atoms.positions + 0.01
    wrapped = moved + np.array([1, 0, -1]) @ cell  # whole cell vectors
    np.testing.assert_allclose(
        nearest_images(wrapped, atoms.positions, cell, [True] * 3), moved, atol=1e-12
    )
    # a non-periodic direction is left as it came
    back = nearest_images(wrapped, atoms.positions, cell, [True, True, False])
    np.testing.assert_allclose(back, moved - cell[2], atol=1e-12)


def test_serve_matches_the_calculator_through_ase_server(model):
    """Energy, forces and stress (from the virial) through the socket equal the
    calculator's; positions wrapped into the cell neither change them nor force a
    neighbor-list rebuild; the client exits cleanly when the server closes."""
    atoms = fcc()
    reference = PESCalculator(model, device="cpu", skin=0.0)
    calculator = PESCalculator(model, device="cpu", skin=0.5)
    name = unique_name()
    log = io.StringIO()
    rng = np.random.default_rng(0)
    with SocketIOCalculator(unixsocket=name) as server:
        thread, out = start_client(
            calculator, atoms, unix=name, wait=30, log=log, log_interval=2
        )
        current = atoms.copy()
        current.calc = server
        for step in range(5):
            current.positions += 0.03 * rng.standard_normal(current.positions.shape)
            if step == 2:
                current.wrap()  # what i-PI sends with <ffsocket pbc='true'>
                assert np.any(current.positions != atoms.positions + 0)
            got = (
                current.get_potential_energy(),
                current.get_forces(),
                current.get_stress(),
            )
            expected = current.copy()
            expected.calc = reference
            assert got[0] == pytest.approx(expected.get_potential_energy(), abs=1e-10)
            np.testing.assert_allclose(got[1], expected.get_forces(), atol=1e-10)
            np.testing.assert_allclose(got[2], expected.get_stress(), atol=1e-12)
            assert np.abs(got[2]).max() > 1e-4  # a stress worth comparing
    thread.join(10)
    assert "error" not in out, out.get("error")
    summary = out["summary"]
    assert summary.requests == 5
    assert summary.exit_reason == "the server closed the connection"
    # one build: the wrapped frame is recognised as a small move
    assert (summary.neighbor_list_builds, summary.neighbor_list_reuses) == (1, 4)
    text = log.getvalue()
    assert "connected to unix socket /tmp/ipi_" in text and "8 atoms (Cu8)" in text
    assert "2 requests" in text and "4 requests" in text
    assert "served 5 requests" in text
    assert np.all(atoms.positions == fcc().positions)  # the template is not touched


def test_serve_a_cluster(model):
    """A non-periodic structure: energy and forces, no stress asked for."""
    cluster = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True)
    cluster.pbc, cluster.cell = False, np.zeros((3, 3))
    cluster.rattle(0.1, seed=2)
    name, log = unique_name(), io.StringIO()
    with SocketIOCalculator(unixsocket=name) as server:
        thread, out = start_client(
            model, cluster, unix=name, device="cpu", wait=30, log=log
        )
        current = cluster.copy()
        current.calc = server
        energy, forces = current.get_potential_energy(), current.get_forces()
    thread.join(10)
    assert out["summary"].requests == 1
    expected = cluster.copy()
    expected.calc = PESCalculator(model, device="cpu")
    assert energy == pytest.approx(expected.get_potential_energy(), abs=1e-10)
    np.testing.assert_allclose(forces, expected.get_forces(), atol=1e-10)
    assert np.abs(forces).max() > 1e-2
    assert "not periodic: sending a zero virial" in log.getvalue()


def test_serve_over_inet_and_wrong_atom_count(model):
    port = free_port()
    with SocketIOCalculator(port=port) as server:
        thread, out = start_client(
            model, fcc(), address=f"localhost:{port}", device="cpu", wait=30
        )
        bigger = fcc((2, 2, 1))
        bigger.calc = server
        with pytest.raises((OSError, AssertionError)):  # the client hangs up
            bigger.get_potential_energy()
    thread.join(10)
    assert isinstance(out.get("error"), IPIError)
    assert "i-PI sent 16 atoms but the structure has 8" in str(out["error"])


def test_serve_errors(model):
    with pytest.raises(UnknownSpeciesError, match="contains Ag"):
        serve(
            model,
            ase.Atoms("CuAg", positions=[[0, 0, 0], [2, 0, 0]]),
            unix=unique_name(),
            device="cpu",
        )
    with pytest.raises(ValueError, match="exactly one"):
        serve(model, fcc(), device="cpu")
    name = unique_name()
    start = time.monotonic()
    with pytest.raises(
        IPIError,
        match=rf"could not connect to i-PI at unix socket "
        rf"/tmp/ipi_{name} after waiting 0.3 s",
    ):
        serve(model, fcc(), unix=name, device="cpu", wait=0.3)
    assert time.monotonic() - start >= 0.3
    with pytest.raises(IPIError, match=r"localhost:\d+ .*is i-PI running"):
        serve(model, fcc(), address=f"localhost:{free_port()}", device="cpu")


@pytest.fixture
def files(tmp_path, model):
    save_model(model, tmp_path / "cu.safetensors")
    ase.io.write(tmp_path / "cu.xyz", fcc())
    ase.io.write(tmp_path / "ag.xyz", ase.build.bulk("Ag", "fcc", a=4.1, cubic=True))
    (tmp_path / "bad.safetensors").write_bytes(b"not a model" * 10)
    return tmp_path


@pytest.mark.parametrize(
    "model_file, extra, message",
    [
        ("cu.safetensors", [], "give one of --address HOST:PORT or --unix NAME"),
        ("cu.safetensors", ["--address", "a:1", "--unix", "x"], "give one of"),
        (
            "cu.safetensors",
            ["--address", "localhost:port"],
            "Invalid value for --address: bad i-PI address 'localhost:port'",
        ),
        ("cu.safetensors", ["--address", "localhost:99999"], "not in 1-65535"),
        (
            "cu.safetensors",
            ["--unix", "NAME", "--structure", "ag.xyz"],
            "contains Ag, which this model does not know; its species are Cu",
        ),
        ("bad.safetensors", ["--unix", "NAME"], "bad.safetensors"),
        ("cu.safetensors", ["--unix", "NAME"], "could not connect to i-PI at unix"),
        (
            "cu.safetensors",
            ["--unix", "NAME", "--structure", "cu.safetensors"],
            "could not read frame 0 of",
        ),
    ],
    ids=[
        "no-address",
        "two-addresses",
        "bad-port",
        "port-range",
        "unknown-element",
        "bad-model",
        "no-server",
        "bad-structure",
    ],
)
def test_cli_ipi_errors(files, model_file, extra, message):
    extra = [unique_name() if arg == "NAME" else arg for arg in extra]
    if "--structure" not in extra:
        extra += ["--structure", "cu.xyz"]
    extra = [
        str(files / arg) if arg.endswith((".xyz", ".safetensors")) else arg
        for arg in extra
    ]
    result = CliRunner().invoke(main, ["ipi", str(files / model_file), *extra])
    assert result.exit_code in (1, 2), result.output
    assert isinstance(result.exception, SystemExit)  # a click error, no traceback
    assert message in " ".join(result.output.split())


def test_cli_ipi_needs_a_structure(files):
    result = CliRunner().invoke(
        main, ["ipi", str(files / "cu.safetensors"), "--address", "localhost:31415"]
    )
    assert result.exit_code == 2
    assert "Missing option '--structure'" in result.output


IPI_INPUT = """<simulation verbosity='low' safe_stride='100000'>
  <output prefix='sim'>
    <properties stride='1' filename='out'>
      [step, potential, bead_potentials, virial_md, temperature{{kelvin}}]
    </properties>
    <trajectory stride='1' filename='pos' format='ase'>positions</trajectory>
    <trajectory stride='1' filename='for' format='ase'>forces</trajectory>
  </output>
  <total_steps>{steps}</total_steps>
  <prng><seed>31415</seed></prng>
  <ffsocket name='pescalc' mode='unix' pbc='true'>
    <address>{name}</address>
  </ffsocket>
  <system>
    <initialize nbeads='2'>
      <file mode='ase'>start.xyz</file>
      <velocities mode='thermal' units='kelvin'>300</velocities>
    </initialize>
    <forces><force forcefield='pescalc'/></forces>
    <ensemble><temperature units='kelvin'>300</temperature></ensemble>
    <motion mode='dynamics'>
      <dynamics mode='nvt'>
        <timestep units='femtosecond'>2</timestep>
        <thermostat mode='pile_g'><tau units='femtosecond'>50</tau></thermostat>
      </dynamics>
    </motion>
  </system>
</simulation>
"""


def wait_for_text(path: Path, text: str, process: subprocess.Popen, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(
        f"no {text!r} in {path}:\n{path.read_text() if path.exists() else ''}"
    )


def test_ipi_pimd_nvt_with_two_clients(model, tmp_path):
    """i-PI's server runs 2-bead PIMD NVT on 8 Cu atoms; a `pes-calc ipi` process
    and a `serve` thread share the beads. i-PI's energies, forces and virial equal
    the calculator's on the positions i-PI wrote."""
    pytest.importorskip("ipi")
    ipi_script = Path(sys.executable).with_name("i-pi")
    if not ipi_script.exists():
        ipi_script = Path(shutil.which("i-pi") or "")
    if not ipi_script.is_file():
        pytest.skip("the i-pi script of the ipi package is not installed")
    steps, name = 20, unique_name()
    save_model(model, tmp_path / "cu.safetensors")
    start = fcc()
    ase.io.write(tmp_path / "start.xyz", start)
    (tmp_path / "input.xml").write_text(IPI_INPUT.format(steps=steps, name=name))
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes: list[subprocess.Popen] = []
    try:
        with open(tmp_path / "client.log", "w") as client_log:
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "pes_calc.cli",
                        "ipi",
                        str(tmp_path / "cu.safetensors"),
                        "--structure",
                        str(tmp_path / "start.xyz"),
                        "--unix",
                        name,
                        "--wait",
                        "60",
                        "--device",
                        "cpu",
                        "--threads",
                        "1",
                        "--log-interval",
                        "10",
                    ],
                    stdout=client_log,
                    stderr=subprocess.STDOUT,
                    env=environment,
                )
            )
        # both clients wait for the socket, so both are there from the first step
        wait_for_text(tmp_path / "client.log", "waiting for i-PI", processes[0], 60)
        log = io.StringIO()
        thread, out = start_client(
            model, start, unix=name, device="cpu", wait=60, log=log
        )
        with open(tmp_path / "ipi.log", "w") as ipi_log:
            processes.append(
                subprocess.Popen(
                    [sys.executable, str(ipi_script), "input.xml"],
                    cwd=tmp_path,
                    stdout=ipi_log,
                    stderr=subprocess.STDOUT,
                    env=environment,
                )
            )
        assert processes[1].wait(timeout=90) == 0, (tmp_path / "ipi.log").read_text()
        assert processes[0].wait(timeout=30) == 0, (tmp_path / "client.log").read_text()
        thread.join(30)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        if os.path.exists(unix_socket_path(name)):
            os.unlink(unix_socket_path(name))

    assert "error" not in out, out.get("error")
    thread_summary = out["summary"]
    client_text = (tmp_path / "client.log").read_text()
    assert "the server sent EXIT: served" in client_text, client_text
    served = int(client_text.split("the server sent EXIT: served ")[1].split()[0])
    # both clients worked; together they did 2 beads × (steps + the initial forces)
    assert served > 0 and thread_summary.requests > 0, (served, thread_summary)
    assert served + thread_summary.requests == 2 * (steps + 1)
    assert thread_summary.exit_reason == "the server sent EXIT"
    # pbc='true' wraps positions; neighbor lists are still reused
    assert thread_summary.neighbor_list_builds <= 2, thread_summary

    table = np.loadtxt(tmp_path / "sim.out", ndmin=2)
    assert table[:, 0].tolist() == list(range(steps + 1))
    # i-PI writes properties in atomic units (Hartree, Hartree/Bohr³) and the
    # format='ase' trajectories in ASE's units (Å, eV/Å)
    bead_energies = table[:, 2:4] * units.Hartree
    virials = table[:, 4:10] * units.Hartree / units.Bohr**3  # xx yy zz xy xz yz
    frames = [ase.io.read(tmp_path / f"sim.pos_{bead}.extxyz", ":") for bead in (0, 1)]
    forces = [ase.io.read(tmp_path / f"sim.for_{bead}.extxyz", ":") for bead in (0, 1)]
    assert len(frames[0]) == len(frames[1]) == steps + 1
    reference = PESCalculator(model, device="cpu", skin=0.0)
    for step in range(0, steps + 1, 4):
        stress_sum = np.zeros(6)
        for bead in (0, 1):
            atoms = start.copy()
            atoms.positions = frames[bead][step].positions
            atoms.cell = frames[bead][step].cell
            atoms.calc = reference
            energy = atoms.get_potential_energy()
            assert bead_energies[step, bead] == pytest.approx(energy, rel=1e-6)
            np.testing.assert_allclose(
                forces[bead][step].get_forces(), atoms.get_forces(), atol=1e-6
            )
            stress_sum += atoms.get_stress()
        # i-PI's virial is the sum over beads of -V·σ, i.e. Σ_b -σ_b per volume
        np.testing.assert_allclose(
            virials[step], -stress_sum[[0, 1, 2, 5, 4, 3]], rtol=1e-6, atol=1e-9
        )
    # the beads differ: a path integral, not two copies of one structure
    assert np.abs(frames[0][-1].positions - frames[1][-1].positions).max() > 1e-4
