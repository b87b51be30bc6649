"""What `run_md` attaches to the dynamics: the observer protocol (`Observer`,
`StopMD`), the trajectory writer and the MD log file."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import ase
import ase.io
from ase import units
from ase.io.trajectory import Trajectory
from ase.md.md import MolecularDynamics

#: called with the ASE dynamics object (``atoms``, ``nsteps``, ``get_time()``)
Observer = Callable[[MolecularDynamics], Any]


class StopMD(Exception):
    """Raised by an observer to end `run_md` cleanly after the current step.

    The message becomes ``MDSummary.stop_reason``.
    """


def _attach(dynamics: MolecularDynamics, function: Observer, interval: int) -> None:
    """Call ``function(dynamics)`` at step 0 and every ``interval`` steps."""
    dynamics.attach(function, interval, dynamics)


class _TrajectoryWriter:
    """Writes frames (with calculator results) to a .traj or extended-XYZ file."""

    def __init__(self, path: str | os.PathLike, atoms: ase.Atoms):
        self.path = Path(path)
        self.atoms = atoms
        suffix = self.path.suffix.lower()
        if suffix not in (".traj", ".xyz", ".extxyz"):
            raise ValueError(
                f"trajectory {self.path}: use a .traj, .xyz or .extxyz file"
            )
        self.traj = None
        self.handle: TextIO | None = None
        if suffix == ".traj":
            self.traj = Trajectory(str(self.path), "w", atoms)
        else:
            self.handle = open(self.path, "w")  # noqa: SIM115 (closed by run_md)

    def __call__(self, dynamics: MolecularDynamics) -> None:
        if self.traj is not None:
            self.traj.write(self.atoms)
        else:
            assert self.handle is not None
            ase.io.write(self.handle, self.atoms, format="extxyz")
            self.handle.flush()

    def close(self) -> None:
        if self.traj is not None:
            self.traj.close()
        if self.handle is not None:
            self.handle.close()


class _Log:
    """One row per call: step, time_ps, Epot, Ekin, Etot (eV), T (K)[, volume]."""

    def __init__(self, path: str | os.PathLike, volume: bool):
        self.path = Path(path)
        self.volume = volume
        self.separator = "," if self.path.suffix.lower() == ".csv" else " "
        columns = ["step", "time_ps", "Epot_eV", "Ekin_eV", "Etot_eV", "T_K"]
        if volume:
            columns.append("volume_A3")
        self.handle = open(self.path, "w")  # noqa: SIM115 (closed by run_md)
        header = self.separator.join(columns)
        self.handle.write(header + "\n" if self.separator == "," else f"# {header}\n")

    def __call__(self, dynamics: MolecularDynamics) -> None:
        atoms = dynamics.atoms
        potential = atoms.get_potential_energy()
        kinetic = atoms.get_kinetic_energy()
        values = [
            f"{dynamics.nsteps:d}",
            f"{dynamics.get_time() / (1000 * units.fs):.6f}",
            f"{potential:.8f}",
            f"{kinetic:.8f}",
            f"{potential + kinetic:.8f}",
            f"{atoms.get_temperature():.3f}",
        ]
        if self.volume:
            values.append(f"{atoms.get_volume():.5f}")
        self.handle.write(self.separator.join(values) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()
