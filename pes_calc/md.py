"""Molecular dynamics with ASE's integrators: `run_md`, `StopMD`, `MDSummary`.

`run_md` sets up velocities, picks the integrator for the ensemble, attaches the
trajectory writer, the log, a progress bar and any user observers, runs, and returns
an `MDSummary`. The integrators are ASE's own:

========  ==========================================================
ensemble  integrator
========  ==========================================================
nve       ``ase.md.verlet.VelocityVerlet``
nvt       ``ase.md.langevin.Langevin`` (default) or ``ase.md.bussi.Bussi``
npt       ``ase.md.nose_hoover_chain.IsotropicMTKNPT`` (MTK barostat and
          Nose-Hoover chains; ``ase.md.npt.NPT`` on ASE versions without it)
========  ==========================================================

Observers are ``(callable, interval)`` pairs: every ``interval`` steps (and at step 0)
the callable is called with the ASE dynamics object (``dynamics.atoms``,
``dynamics.nsteps``, ``dynamics.get_time()``). An observer ends the run cleanly by
raising `StopMD`; its message is reported as ``MDSummary.stop_reason``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

import ase
import numpy as np
from ase import units
from ase.md.md import MolecularDynamics
from ase.md.velocitydistribution import Stationary, ZeroRotation

Ensemble = Literal["nve", "nvt", "npt"]
Thermostat = Literal["langevin", "bussi"]
Observer = Callable[[MolecularDynamics], Any]

ENSEMBLES = ("nve", "nvt", "npt")
THERMOSTATS = ("langevin", "bussi")
#: ASE bulk modulus guess used only by the ``ase.md.npt.NPT`` fallback (pfactor)
_FALLBACK_BULK_MODULUS_GPA = 100.0


class StopMD(Exception):
    """Raised by an observer to end `run_md` cleanly after the current step.

    The message becomes ``MDSummary.stop_reason``.
    """


@dataclass
class MDSummary:
    """What a `run_md` call did.

    ``energy_drift_per_atom`` (NVE only, else None) is max |Etot(t) - Etot(0)| / N
    in eV/atom over every step. ``ms_per_step`` is the wall time of the stepping
    (observers included, set-up excluded) per step; NaN if no step ran.
    """

    ensemble: str
    num_atoms: int
    steps: int
    requested_steps: int
    timestep_fs: float
    wall_time_s: float
    ms_per_step: float
    final_temperature: float
    energy_drift_per_atom: float | None = None
    final_volume: float | None = None
    stop_reason: str | None = None

    @property
    def completed(self) -> bool:
        """True when every requested step ran (no observer stopped the run)."""
        return self.stop_reason is None

    def __str__(self) -> str:
        lines = [
            f"{self.ensemble} MD: {self.num_atoms} atoms, "
            f"{self.steps}/{self.requested_steps} steps of {self.timestep_fs:g} fs "
            f"in {self.wall_time_s:.2f} s ({self.ms_per_step:.2f} ms/step)",
            f"  final temperature  {self.final_temperature:.1f} K",
        ]
        if self.energy_drift_per_atom is not None:
            lines.append(
                f"  energy drift       {self.energy_drift_per_atom:.3e} eV/atom "
                "(max |Etot - Etot0| / N)"
            )
        if self.final_volume is not None:
            lines.append(f"  final volume       {self.final_volume:.3f} Å³")
        if self.stop_reason is not None:
            lines.append(f"  stopped early      {self.stop_reason}")
        return "\n".join(lines)


def run_md(
    atoms: ase.Atoms,
    calculator: Any,
    *,
    ensemble: Ensemble = "nve",
    temperature: float = 300.0,
    steps: int = 1000,
    timestep: float = 1.0,
    thermostat: Thermostat = "langevin",
    friction: float = 0.01,
    tdamp: float | None = None,
    pdamp: float | None = None,
    pressure: float = 0.0,
    trajectory: str | os.PathLike | None = None,
    trajectory_interval: int = 10,
    log: str | os.PathLike | None = None,
    log_interval: int = 10,
    progress: bool = True,
    seed: int | None = None,
    init_velocities: bool = True,
    observers: Iterable[Observer | tuple[Observer, int]] = (),
) -> MDSummary:
    """Run molecular dynamics on ``atoms`` (changed in place) and summarise it.

    Parameters
    ----------
    atoms
        The structure; it ends in the final state of the run.
    calculator
        An ASE calculator, or anything `PESCalculator` accepts (a model object or
        the path of a model file), which is wrapped in one; set as ``atoms.calc``.
    ensemble
        ``"nve"``, ``"nvt"`` or ``"npt"`` (isotropic cell fluctuations; needs a
        cell periodic in all three directions with a volume).
    temperature
        Kelvin: the thermostat's target, and the temperature of the initial
        Maxwell-Boltzmann velocities.
    steps, timestep
        Number of steps and the step in fs.
    thermostat
        NVT thermostat: ``"langevin"`` (uses ``friction``) or ``"bussi"``
        (stochastic velocity rescaling, uses ``tdamp``).
    friction
        Langevin friction in 1/fs. The Langevin thermostat acts on all 3N degrees
        of freedom (ASE's deprecated ``fixcm`` is off), so the centre of mass
        drifts a little, as it should at that temperature.
    tdamp, pdamp
        Thermostat (Bussi, NPT) and barostat (NPT) time constants in fs; by
        default 100 and 1000 timesteps, as ASE recommends.
    pressure
        External pressure in GPa (NPT).
    trajectory, trajectory_interval
        A ``.traj`` (ASE trajectory) or ``.xyz``/``.extxyz`` file, written at step 0
        and every ``trajectory_interval`` steps with the calculator's results.
    log, log_interval
        A table of step, time (ps), potential, kinetic and total energy (eV),
        temperature (K) and, for NPT, volume (Å³), written at step 0 and every
        ``log_interval`` steps: comma-separated for a ``.csv`` file, otherwise
        whitespace-separated with a ``#`` header (``numpy.loadtxt`` reads both).
    progress
        Show a tqdm progress bar (on stderr).
    seed
        Seed of the initial velocities and of the stochastic thermostats.
    init_velocities
        Draw Maxwell-Boltzmann velocities at ``temperature`` (scaled to exactly
        that temperature, no centre-of-mass motion, and no rotation for a
        non-periodic structure). False keeps the momenta ``atoms`` carries.
    observers
        ``(callable, interval)`` pairs (a bare callable means interval 1), called
        with the dynamics object at step 0 and every ``interval`` steps after the
        trajectory and the log. Raising `StopMD` ends the run cleanly.

    Examples
    --------
    >>> import ase.build
    >>> from pes_calc import build_model
    >>> soap = {"max_angular": 2, "max_radial": 2}
    >>> model = build_model("soap_bpnn", ["Cu"], soap=soap)
    >>> atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    >>> summary = run_md(atoms, model, steps=5, progress=False, seed=0)
    >>> summary.steps, summary.energy_drift_per_atom < 1e-3
    (5, True)
    """
    _check_arguments(atoms, ensemble, thermostat, steps, timestep, temperature)
    for name, interval in (("trajectory", trajectory_interval), ("log", log_interval)):
        if interval < 1:
            raise ValueError(f"{name}_interval must be ≥ 1, got {interval}")
    observer_pairs = [_observer_pair(observer) for observer in observers]
    atoms.calc = _as_calculator(calculator)
    rng = np.random.default_rng(seed)
    if init_velocities:
        _init_velocities(atoms, temperature, rng)
    dynamics = _dynamics(
        atoms, ensemble, thermostat, temperature=temperature, timestep=timestep,
        friction=friction, tdamp=tdamp, pdamp=pdamp, pressure=pressure, rng=rng,
    )
    num_atoms = len(atoms)
    # evaluates the model once, raising bad-input errors before any file is opened
    start_energy = atoms.get_potential_energy() + atoms.get_kinetic_energy()
    drift = [0.0]

    def track_drift(dyn: MolecularDynamics) -> None:
        total = dyn.atoms.get_potential_energy() + dyn.atoms.get_kinetic_energy()
        drift[0] = max(drift[0], float(abs(total - start_energy)))

    stop_reason = None
    with ExitStack() as stack:
        if ensemble == "nve":
            _attach(dynamics, track_drift, 1)
        if trajectory is not None:
            write = _TrajectoryWriter(trajectory, atoms)
            stack.callback(write.close)
            _attach(dynamics, write, trajectory_interval)
        if log is not None:
            logger = _Log(log, volume=ensemble == "npt")
            stack.callback(logger.close)
            _attach(dynamics, logger, log_interval)
        if progress:
            from tqdm import tqdm

            bar = stack.enter_context(
                tqdm(total=steps, unit="step", desc=f"{ensemble} MD", leave=True)
            )

            def update_bar(dyn: MolecularDynamics) -> None:
                bar.update(dyn.nsteps - bar.n)
                if dyn.nsteps % 10 == 0:
                    bar.set_postfix(T=f"{dyn.atoms.get_temperature():.0f} K",
                                    refresh=False)

            _attach(dynamics, update_bar, 1)
        for observer, interval in observer_pairs:
            _attach(dynamics, observer, interval)
        start = time.perf_counter()
        try:
            dynamics.run(steps)
        except StopMD as stop:
            stop_reason = str(stop) or "stopped by an observer"
        wall_time = time.perf_counter() - start
    steps_run = int(dynamics.nsteps)
    has_volume = bool(atoms.pbc.all() and abs(atoms.cell.volume) > 1e-12)
    return MDSummary(
        ensemble=ensemble,
        num_atoms=num_atoms,
        steps=steps_run,
        requested_steps=steps,
        timestep_fs=float(timestep),
        wall_time_s=wall_time,
        ms_per_step=1000.0 * wall_time / steps_run if steps_run else math.nan,
        final_temperature=float(atoms.get_temperature()),
        energy_drift_per_atom=drift[0] / num_atoms if ensemble == "nve" else None,
        final_volume=float(atoms.get_volume()) if has_volume else None,
        stop_reason=stop_reason,
    )


def _check_arguments(
    atoms: ase.Atoms, ensemble: str, thermostat: str, steps: int, timestep: float,
    temperature: float,
) -> None:
    if ensemble not in ENSEMBLES:
        raise ValueError(f"unknown ensemble {ensemble!r}; choose one of {ENSEMBLES}")
    if thermostat not in THERMOSTATS:
        raise ValueError(
            f"unknown thermostat {thermostat!r}; choose one of {THERMOSTATS}"
        )
    if steps < 0:
        raise ValueError(f"steps must be ≥ 0, got {steps}")
    if not timestep > 0:
        raise ValueError(f"timestep must be > 0 fs, got {timestep}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be ≥ 0 K, got {temperature}")
    if len(atoms) == 0:
        raise ValueError("the structure has no atoms")
    if ensemble == "npt" and not (
        atoms.pbc.all() and abs(atoms.cell.volume) > 1e-12
    ):
        raise ValueError(
            "npt needs a cell that is periodic in all three directions and has a "
            f"volume; this structure has pbc={atoms.pbc.tolist()} and cell volume "
            f"{abs(atoms.cell.volume):.3g} Å³ (use nvt or nve for clusters and slabs)"
        )


def _as_calculator(calculator: Any) -> Any:
    from ase.calculators.calculator import BaseCalculator

    if isinstance(calculator, BaseCalculator):
        return calculator
    from pes_calc.calculator import PESCalculator

    return PESCalculator(calculator)


def _observer_pair(observer: Any) -> tuple[Observer, int]:
    if callable(observer):
        return observer, 1
    function, interval = observer
    if not callable(function) or int(interval) < 1:
        raise ValueError(
            "an observer is a callable or a (callable, interval ≥ 1) pair; "
            f"got {observer!r}"
        )
    return function, int(interval)


def _attach(dynamics: MolecularDynamics, function: Observer, interval: int) -> None:
    dynamics.attach(function, interval, dynamics)


def _init_velocities(
    atoms: ase.Atoms, temperature: float, rng: np.random.Generator
) -> None:
    """Maxwell-Boltzmann momenta at exactly ``temperature``, no drift or spin."""
    try:
        from ase.md.velocitydistribution import thermalize_momenta
    except ImportError:  # ASE < 3.29
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    else:
        thermalize_momenta(atoms, temperature, rng=rng)
    Stationary(atoms, preserve_temperature=False)
    if not atoms.pbc.any() and len(atoms) > 2:
        moments = atoms.get_moments_of_inertia()
        if moments.min() > 1e-6 * moments.max():  # ZeroRotation fails for a line
            ZeroRotation(atoms, preserve_temperature=False)
    current = atoms.get_temperature()
    if current > 0:  # zero for T = 0 K or a single atom
        atoms.set_momenta(atoms.get_momenta() * np.sqrt(temperature / current))


def _dynamics(
    atoms: ase.Atoms, ensemble: str, thermostat: str, *, temperature: float,
    timestep: float, friction: float, tdamp: float | None, pdamp: float | None,
    pressure: float, rng: np.random.Generator,
) -> MolecularDynamics:
    dt = timestep * units.fs
    tdamp_fs = 100.0 * timestep if tdamp is None else tdamp
    pdamp_fs = 1000.0 * timestep if pdamp is None else pdamp
    if ensemble == "nve":
        from ase.md.verlet import VelocityVerlet

        return VelocityVerlet(atoms, timestep=dt)
    if ensemble == "nvt" and thermostat == "langevin":
        from ase.md.langevin import Langevin

        return Langevin(
            atoms, dt, temperature_K=temperature, friction=friction / units.fs,
            fixcm=False, rng=rng,
        )
    if ensemble == "nvt":
        from ase.md.bussi import Bussi

        return Bussi(
            atoms, dt, temperature_K=temperature, taut=tdamp_fs * units.fs, rng=rng
        )
    npt_class = _npt_class()
    if npt_class.__name__ == "IsotropicMTKNPT":
        return npt_class(
            atoms, dt, temperature_K=temperature, pressure_au=pressure * units.GPa,
            tdamp=tdamp_fs * units.fs, pdamp=pdamp_fs * units.fs,
        )
    # ase.md.npt.NPT (Nose-Hoover + Parrinello-Rahman): pfactor = ptime² B
    return npt_class(
        atoms, dt, temperature_K=temperature, externalstress=pressure * units.GPa,
        ttime=tdamp_fs * units.fs,
        pfactor=(pdamp_fs * units.fs) ** 2 * _FALLBACK_BULK_MODULUS_GPA * units.GPa,
    )


def _npt_class() -> type:
    try:
        from ase.md.nose_hoover_chain import IsotropicMTKNPT
    except ImportError:  # ASE < 3.25
        from ase.md.npt import NPT

        return NPT
    return IsotropicMTKNPT


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
            from ase.io.trajectory import Trajectory

            self.traj = Trajectory(str(self.path), "w", atoms)
        else:
            self.handle = open(self.path, "w")  # noqa: SIM115 (closed by run_md)

    def __call__(self, dynamics: MolecularDynamics) -> None:
        if self.traj is not None:
            self.traj.write(self.atoms)
        else:
            import ase.io

            ase.io.write(self.handle, self.atoms, format="extxyz")
            assert self.handle is not None
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
