"""`run_md`, which sets up and runs ASE molecular dynamics, and its `MDSummary`."""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import ase
import numpy as np
from ase.calculators.calculator import BaseCalculator
from ase.md.md import MolecularDynamics
from tqdm import tqdm

from pes_calc.calculator import PESCalculator
from pes_calc.md.dynamics import (
    ENSEMBLES,
    THERMOSTATS,
    Ensemble,
    Thermostat,
    _dynamics,
    maxwell_boltzmann_velocities,
)
from pes_calc.md.observers import Observer, StopMD, _attach, _Log, _TrajectoryWriter
from pes_calc.md.uncertainty import UNCERTAINTY_MEASURES, UncertaintyWatch


@dataclass
class MDSummary:
    """What a `run_md` call did.

    ``energy_drift_per_atom`` (NVE only, else None) is max |Etot(t) - Etot(0)| / N
    in eV/atom over every step. ``ms_per_step`` is the wall time of the stepping
    (observers included, set-up excluded) per step; NaN if no step ran.

    With an `UncertaintyWatch` among the observers (the first one, if several):
    ``max_uncertainty_seen`` is the largest value it measured in this run (NaN if
    it never checked), in the unit of its ``uncertainty_measure`` (eV/Å, eV or
    eV/atom), and ``first_uncertain_step`` the first step it found over its
    threshold (None if none). All three are None without a watch.
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
    max_uncertainty_seen: float | None = None
    uncertainty_measure: str | None = None
    first_uncertain_step: int | None = None

    @property
    def completed(self) -> bool:
        """True when every requested step ran (no observer stopped the run)."""
        return self.stop_reason is None

    def __str__(self) -> str:
        lines = [
            f"{self.ensemble} MD: {self.num_atoms} atoms, "
            f"{self.steps}/{self.requested_steps} steps of {self.timestep_fs:g} fs "
            f"in {self.wall_time_s:.2f} s "
            + (f"({self.ms_per_step:.2f} ms/step)" if self.steps else "(no steps run)"),
            f"  final temperature  {self.final_temperature:.1f} K",
        ]
        if self.energy_drift_per_atom is not None:
            lines.append(
                f"  energy drift       {self.energy_drift_per_atom:.3e} eV/atom "
                "(max |Etot - Etot0| / N)"
            )
        if self.final_volume is not None:
            lines.append(f"  final volume       {self.final_volume:.3f} Å³")
        if self.max_uncertainty_seen is not None and self.uncertainty_measure:
            unit = UNCERTAINTY_MEASURES[self.uncertainty_measure]
            lines.append(
                f"  max uncertainty    {self.max_uncertainty_seen:.4g} {unit} "
                f"({self.uncertainty_measure})"
            )
        if self.first_uncertain_step is not None:
            lines.append(
                f"  over threshold     first at step {self.first_uncertain_step}"
            )
        if self.stop_reason is not None:
            lines.append(f"  stopped early      {self.stop_reason}")
        return "\n".join(lines)


def run_md(
    calculator: Any,
    atoms: ase.Atoms,
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
    calculator
        An ASE calculator, or anything `PESCalculator` accepts (a model object or
        the path of a model file), which is wrapped in one; set as ``atoms.calc``.
        First, as everywhere in pes_calc (model, then data); the 0.1 order
        ``run_md(atoms, calculator)`` still works for one release, with a warning.
    atoms
        The structure; it ends in the final state of the run.
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
        trajectory and the log. Raising `StopMD` ends the run cleanly. A bare
        `UncertaintyWatch` is attached with its own ``interval``, and the first
        watch fills the uncertainty fields of the summary.

    Examples
    --------
    >>> import ase.build
    >>> from pes_calc import build_model
    >>> soap = {"max_angular": 2, "max_radial": 2}
    >>> model = build_model("soap_bpnn", ["Cu"], soap=soap)
    >>> atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    >>> summary = run_md(model, atoms, steps=5, progress=False, seed=0)
    >>> summary.steps, summary.energy_drift_per_atom < 1e-3
    (5, True)
    """
    if isinstance(calculator, ase.Atoms) and not isinstance(atoms, ase.Atoms):
        warnings.warn(
            "run_md(atoms, calculator) is deprecated: pass the model first, "
            "run_md(calculator, atoms)",
            DeprecationWarning,
            stacklevel=2,
        )
        calculator, atoms = atoms, calculator
    _check_arguments(atoms, ensemble, thermostat, steps, timestep, temperature)
    for name, interval in (("trajectory", trajectory_interval), ("log", log_interval)):
        if interval < 1:
            raise ValueError(f"{name}_interval must be ≥ 1, got {interval}")
    observer_pairs = [_observer_pair(observer) for observer in observers]
    watch = next(
        (obs for obs, _ in observer_pairs if isinstance(obs, UncertaintyWatch)), None
    )
    # a watch may be reused across runs: the summary reports this run's checks only
    checks_before = watch.num_checks if watch is not None else 0
    atoms.calc = _as_calculator(calculator)
    rng = np.random.default_rng(seed)
    if init_velocities:
        maxwell_boltzmann_velocities(atoms, temperature, rng)
    dynamics = _dynamics(
        atoms,
        ensemble,
        thermostat,
        temperature=temperature,
        timestep=timestep,
        friction=friction,
        tdamp=tdamp,
        pdamp=pdamp,
        pressure=pressure,
        rng=rng,
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
            bar = stack.enter_context(
                tqdm(total=steps, unit="step", desc=f"{ensemble} MD", leave=True)
            )

            def update_bar(dyn: MolecularDynamics) -> None:
                bar.update(dyn.nsteps - bar.n)
                if dyn.nsteps % 10 == 0:
                    bar.set_postfix(
                        T=f"{dyn.atoms.get_temperature():.0f} K", refresh=False
                    )

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
    uncertainty: dict[str, Any] = {}
    if watch is not None:
        largest, first_step = watch._since(checks_before)
        uncertainty = dict(
            max_uncertainty_seen=largest,
            uncertainty_measure=watch.measure,
            first_uncertain_step=first_step,
        )
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
        final_volume=float(atoms.get_volume()) if _has_volume(atoms) else None,
        stop_reason=stop_reason,
        **uncertainty,
    )


def _check_arguments(
    atoms: ase.Atoms,
    ensemble: str,
    thermostat: str,
    steps: int,
    timestep: float,
    temperature: float,
) -> None:
    """Raise ValueError for an argument of `run_md` it cannot run with."""
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
    if ensemble == "npt" and not _has_volume(atoms):
        raise ValueError(
            "npt needs a cell that is periodic in all three directions and has a "
            f"volume; this structure has pbc={atoms.pbc.tolist()} and cell volume "
            f"{abs(atoms.cell.volume):.3g} Å³ (use nvt or nve for clusters and slabs)"
        )


def _as_calculator(calculator: Any) -> Any:
    """An ASE calculator as it is; a model or a model file in a `PESCalculator`."""
    if isinstance(calculator, BaseCalculator):
        return calculator
    return PESCalculator(calculator)


def _observer_pair(observer: Any) -> tuple[Observer, int]:
    """``(callable, interval)`` from a bare callable, a watch or such a pair."""
    if isinstance(observer, UncertaintyWatch):
        return observer, observer.interval
    if callable(observer):
        return observer, 1
    function, interval = observer
    if not callable(function) or int(interval) < 1:
        raise ValueError(
            "an observer is a callable or a (callable, interval ≥ 1) pair; "
            f"got {observer!r}"
        )
    return function, int(interval)


def _has_volume(atoms: ase.Atoms) -> bool:
    """True for a cell periodic in all three directions with a nonzero volume."""
    return bool(atoms.pbc.all() and abs(atoms.cell.volume) > 1e-12)
