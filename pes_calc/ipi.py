"""Serve pes_calc forces to an i-PI server: `serve` and ``pes-calc ipi``.

i-PI (https://ipi-code.org) runs the dynamics (path integrals, replica exchange,
thermostats, barostats) and asks its clients, over a socket, for the energy, forces
and virial of one configuration at a time. Several clients on one socket share the
beads or replicas of a step, so MD scales past one machine. `serve` is such a
client: the messages are read and written by ASE's implementation of the protocol
(``ase.calculators.socketio.IPIProtocol``, what ASE's ``SocketClient`` uses); the
loop around them is ours, so that a wrong atom count or an out-of-order message
is a clear error rather than an ``assert``, and each request is timed.

What crosses the socket, in i-PI's atomic units (ASE's protocol converts):

==========  ======================  ===================================
message     pes_calc side           i-PI side
==========  ======================  ===================================
POSDATA     cell rows, positions Å  cell, inverse cell, positions, Bohr
FORCEREADY  energy eV, forces eV/Å  Hartree, Hartree/Bohr
..          virial -V·stress, eV    Hartree (i-PI's virial, Σ r⊗f)
==========  ======================  ===================================

i-PI sends neither species nor periodicity: both come from a template structure,
whose atoms must be those of i-PI's input in the same order. A template without a
periodic cell with a volume (a molecule) sends a zero virial.

Positions may arrive wrapped into the cell (``<ffsocket pbc='true'>``) or not (the
default). Each atom is moved by whole cell vectors, in the template's periodic
directions, to the image nearest its position in the previous request
(`nearest_images`): energy, forces and virial are unchanged, and the calculator's
Verlet-skin neighbor list, which compares positions with those it was built for,
sees a small move instead of a jump that would force a rebuild.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import TextIO

import ase
import numpy as np
import torch
from ase.calculators.socketio import IPIProtocol, SocketClosed, actualunixsocketname

from pes_calc.calculator import PESCalculator
from pes_calc.neighbors import species_indices
from pes_calc.results import has_volume

#: i-PI's default inet port (``<ffsocket mode='inet'><port>``)
DEFAULT_PORT = 31415
#: seconds between connection attempts while waiting for the server
_RETRY_INTERVAL = 0.1


class IPIError(RuntimeError):
    """Connecting to, or talking with, the i-PI server failed."""


@dataclass
class ServeSummary:
    """What one `serve` call did.

    ``requests``: configurations computed and returned; ``compute_s``: wall time
    in the calculator (neighbor list, model, conversions), s; ``connected_s``:
    wall time from connection to exit, s; ``exit_reason``: why the loop ended.
    """

    server: str
    requests: int
    compute_s: float
    connected_s: float
    neighbor_list_builds: int
    neighbor_list_reuses: int
    exit_reason: str

    @property
    def ms_per_request(self) -> float:
        """Calculator time per configuration, ms (NaN before the first)."""
        return 1e3 * self.compute_s / self.requests if self.requests else float("nan")

    def __str__(self) -> str:
        return (
            f"{self.exit_reason}: served {self.requests} requests from {self.server} "
            f"in {self.connected_s:.1f} s, {self.ms_per_request:.2f} ms per request "
            f"in the calculator; neighbor lists built {self.neighbor_list_builds}, "
            f"reused {self.neighbor_list_reuses}"
        )


def parse_address(address: str) -> tuple[str, int]:
    """``"HOST:PORT"`` → ``(host, port)``; ``"HOST"`` alone takes port 31415.

    Raises ``ValueError`` with the expected form for anything else.
    """
    host, colon, port_text = address.strip().rpartition(":")
    if not colon:
        host, port_text = address.strip(), str(DEFAULT_PORT)
    if not host or any(c.isspace() for c in host):
        raise ValueError(
            f"bad i-PI address {address!r}: expected HOST:PORT, e.g. localhost:31415"
        )
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(
            f"bad i-PI address {address!r}: the port {port_text!r} is not a whole "
            "number (expected HOST:PORT, e.g. localhost:31415)"
        ) from None
    if not 1 <= port <= 65535:
        raise ValueError(f"bad i-PI address {address!r}: port {port} is not in 1-65535")
    return host, port


def unix_socket_path(name: str) -> str:
    """The file of i-PI's unix socket NAME: ``/tmp/ipi_NAME``.

    That is where i-PI (default ``sockets_prefix``) and ASE put it; a NAME with a
    ``/`` is taken as the whole path, for i-PI runs with another prefix.
    """
    if not name:
        raise ValueError("the unix socket name is empty")
    return name if "/" in name else actualunixsocketname(name)


def connect(
    address: str | None = None, unix: str | None = None, wait: float = 0.0
) -> tuple[socket.socket, str]:
    """Connect to i-PI at ``address`` (``HOST:PORT``) or unix socket ``unix``.

    Retries for up to ``wait`` seconds while no server listens there yet (i-PI
    opens its socket a moment after it starts). Returns the connected socket and
    a description of the server; raises `IPIError` with what to check.
    """
    if (address is None) == (unix is None):
        raise ValueError(
            "give exactly one of an inet address (HOST:PORT) or a unix socket name"
        )
    if unix is not None:
        target: str | tuple[str, int] = unix_socket_path(unix)
        family, where = socket.AF_UNIX, f"unix socket {target}"
        advice = (
            f"is i-PI running with <ffsocket mode='unix'><address>{unix}</address>?"
        )
    else:
        assert address is not None
        target = parse_address(address)
        family, where = socket.AF_INET, f"{target[0]}:{target[1]}"
        advice = (
            f"is i-PI running with <ffsocket mode='inet'><address>{target[0]}"
            f"</address><port>{target[1]}</port>, and reachable from here?"
        )
    deadline = time.monotonic() + wait
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.connect(target)
        except (ConnectionRefusedError, FileNotFoundError) as error:
            sock.close()
            if time.monotonic() >= deadline:
                waited = f" after waiting {wait:g} s" if wait > 0 else ""
                raise IPIError(
                    f"could not connect to i-PI at {where}{waited} "
                    f"({error.strerror or error}); {advice} (--wait SECONDS retries "
                    "while i-PI starts)"
                ) from None
            time.sleep(_RETRY_INTERVAL)
            continue
        except socket.gaierror as error:
            sock.close()
            raise IPIError(
                f"cannot resolve the i-PI host {target[0]!r}: {error.strerror}"
            ) from None
        except OSError as error:
            sock.close()
            raise IPIError(f"could not connect to i-PI at {where}: {error}") from None
        if family == socket.AF_INET:
            # one small message each way per step: Nagle's delay would dominate
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, where


def serve(
    model: torch.nn.Module | str | os.PathLike | PESCalculator,
    structure: ase.Atoms,
    *,
    address: str | None = None,
    unix: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    skin: float = 0.5,
    wait: float = 0.0,
    log: TextIO | None = None,
    log_interval: int = 100,
) -> ServeSummary:
    """Compute energies, forces and virials for an i-PI server until it says EXIT.

    Parameters
    ----------
    model
        A model file or object (as for `PESCalculator`), or a ready calculator,
        in which case ``device``, ``dtype`` and ``skin`` are not used.
    structure
        Template: species, atom order and periodicity of what i-PI simulates (its
        positions and cell are replaced by i-PI's each request). Not modified.
    address, unix
        Exactly one: ``"HOST:PORT"`` of an inet socket, or the NAME of a unix
        socket ``/tmp/ipi_NAME``.
    skin
        Verlet skin of the neighbor list, Å.
    wait
        Seconds to keep trying to connect while the server is not up yet.
    log
        Where to write progress (connection, every ``log_interval`` requests and
        a summary); None for silence.

    Returns a `ServeSummary` once the server sends EXIT or closes the connection.
    Raises `IPIError` for connection and protocol failures, ``ValueError``
    (``UnknownSpeciesError``, ``ModelFileError``) for a bad model or structure.
    """
    if log_interval < 1:
        raise ValueError("log_interval must be ≥ 1")
    if (address is None) == (unix is None):
        raise ValueError(
            "give exactly one of an inet address (HOST:PORT) or a unix socket name"
        )
    target = address if unix is None else unix_socket_path(unix)
    if isinstance(model, PESCalculator):
        calculator = model
    else:
        calculator = PESCalculator(model, device=device, dtype=dtype, skin=skin)
    species_indices(structure.get_chemical_symbols(), calculator.species)
    atoms = ase.Atoms(
        structure.numbers,
        positions=structure.positions,
        cell=structure.cell,
        pbc=structure.pbc,
    )
    atoms.calc = calculator
    periodic = bool(np.any(atoms.pbc))

    def say(message: str) -> None:
        if log is not None:
            print(f"pes-calc ipi: {message}", file=log, flush=True)

    say(f"{'waiting for' if wait > 0 else 'connecting to'} i-PI at {target}")
    sock, server = connect(address, unix, wait)
    say(
        f"connected to {server}: {len(atoms)} atoms ({atoms.get_chemical_formula()}), "
        f"{calculator.device} {str(calculator.dtype).removeprefix('torch.')}, "
        f"skin {calculator.skin:g} Å"
        + ("" if periodic else "; not periodic: sending a zero virial")
    )
    protocol = IPIProtocol(sock)
    builds0 = calculator.neighbor_list_builds
    reuses0 = calculator.neighbor_list_reuses
    state, requests, compute_s = "READY", 0, 0.0
    start = time.perf_counter()
    result: tuple[float, np.ndarray, np.ndarray] | None = None
    previous: np.ndarray | None = None
    exit_reason = "the server closed the connection"
    try:
        while True:
            try:
                message = protocol.recvmsg()
            except UnicodeDecodeError:
                raise IPIError(
                    f"{server} does not speak the i-PI protocol "
                    "(a header that is not ASCII)"
                ) from None
            if message == "EXIT":
                exit_reason = "the server sent EXIT"
                break
            if message == "STATUS":
                protocol.sendmsg(state)
            elif message == "INIT":
                protocol.recvinit()  # bead index and a parameter string: unused
                state = "READY"
            elif message == "POSDATA":
                try:
                    cell, _, positions = protocol.recvposdata()
                except AssertionError:  # ASE asserts finite values
                    raise IPIError(
                        "i-PI sent NaN or infinite positions or cell"
                    ) from None
                if len(positions) != len(atoms):
                    raise IPIError(
                        f"i-PI sent {len(positions)} atoms but the structure has "
                        f"{len(atoms)}; give the structure i-PI simulates (same "
                        "atoms, same order)"
                    )
                tick = time.perf_counter()
                if previous is not None and periodic:
                    positions = nearest_images(positions, previous, cell, atoms.pbc)
                previous = positions
                result = _compute(atoms, cell, positions)
                compute_s += time.perf_counter() - tick
                requests += 1
                state = "HAVEDATA"
                if requests == 1 or requests % log_interval == 0:
                    say(
                        f"{requests} requests, {1e3 * compute_s / requests:.2f} ms "
                        f"per request, neighbor lists built "
                        f"{calculator.neighbor_list_builds - builds0}"
                    )
            elif message == "GETFORCE":
                if state != "HAVEDATA" or result is None:
                    raise IPIError("i-PI asked for forces before sending positions")
                protocol.sendforce(*result)
                state, result = "READY", None
            else:
                raise IPIError(f"unexpected message {message!r} from {server}")
    except (SocketClosed, ConnectionResetError, BrokenPipeError):
        pass  # the server went away between requests or during one: done
    finally:
        sock.close()
    summary = ServeSummary(
        server=server,
        requests=requests,
        compute_s=compute_s,
        connected_s=time.perf_counter() - start,
        neighbor_list_builds=calculator.neighbor_list_builds - builds0,
        neighbor_list_reuses=calculator.neighbor_list_reuses - reuses0,
        exit_reason=exit_reason,
    )
    say(str(summary))
    return summary


def nearest_images(
    positions: np.ndarray, previous: np.ndarray, cell: np.ndarray, pbc: np.ndarray
) -> np.ndarray:
    """``positions`` moved by whole cell vectors (periodic directions only) to the
    image of each atom nearest its ``previous`` position (Å, cell rows in Å).

    Energy, forces and virial do not change, but the Verlet-skin neighbor list
    then sees an atom that i-PI wrapped back into the cell, or the same atom in
    another bead, as the small move it is, not as a jump that forces a rebuild.
    """
    if abs(np.linalg.det(cell)) < 1e-12:
        return positions
    fractional = np.linalg.solve(cell.T, (positions - previous).T).T
    shift = np.where(np.asarray(pbc, bool), np.round(fractional), 0.0)
    return positions - shift @ cell


def _compute(
    atoms: ase.Atoms, cell: np.ndarray, positions: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """Energy (eV), forces (eV/Å) and virial (eV) at i-PI's cell and positions (Å)."""
    atoms.cell[:] = cell
    atoms.positions[:] = positions
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    if has_volume(atoms):
        # i-PI's virial is Σ r⊗f = -V·σ with ASE's sign of the stress σ
        virial = -atoms.cell.volume * atoms.get_stress(voigt=False)
    else:
        virial = np.zeros((3, 3))
    return energy, forces, virial
