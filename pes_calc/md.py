"""Molecular dynamics with ASE's integrators: `run_md`, `StopMD`, `MDSummary`,
and `UncertaintyWatch`, an observer that stops or records on LLPR uncertainty.

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
`UncertaintyWatch` is such an observer: it reads the LLPR uncertainty of the current
structure and stops the run, or records the structure, when it exceeds a threshold.
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
from ase.calculators.calculator import PropertyNotImplementedError
from ase.md.md import MolecularDynamics
from ase.md.velocitydistribution import Stationary, ZeroRotation

Ensemble = Literal["nve", "nvt", "npt"]
Thermostat = Literal["langevin", "bussi"]
Observer = Callable[[MolecularDynamics], Any]

ENSEMBLES = ("nve", "nvt", "npt")
THERMOSTATS = ("langevin", "bussi")
#: what `UncertaintyWatch` compares with its threshold, and the unit of each
UNCERTAINTY_MEASURES = {"forces": "eV/Å", "energy": "eV", "energy_per_atom": "eV/atom"}
ON_UNCERTAIN = ("stop", "record")
_UNCERTAINTY_LOG_COLUMNS = (
    "step", "time_fs", "energy_uncertainty_eV", "max_force_uncertainty_eV/A"
)
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
    >>> summary = run_md(atoms, model, steps=5, progress=False, seed=0)
    >>> summary.steps, summary.energy_drift_per_atom < 1e-3
    (5, True)
    """
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
    uncertainty: dict[str, Any] = {}
    if watch is not None:
        largest, first_step = watch._since(checks_before)
        uncertainty = dict(
            max_uncertainty_seen=largest, uncertainty_measure=watch.measure,
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
        final_volume=float(atoms.get_volume()) if has_volume else None,
        stop_reason=stop_reason,
        **uncertainty,
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


# ---------------------------------------------------------------- uncertainty


class UncertaintyWatch:
    """Observer for run_md / ASE dynamics: reads the LLPR uncertainty of the current
    structure.

    At step 0 and every ``interval`` steps it reads, from the calculator of
    ``dynamics.atoms`` (a `PESCalculator` of an LLPR model), the energy uncertainty
    σ_E (eV) and the per-atom force uncertainty ‖σ_F,i‖ (eV/Å, the norm over x, y, z
    of ``forces_uncertainty``), logs both, and compares one of them, ``measure``,
    with ``max_uncertainty``:

    ===================  ==========================  ========
    measure              value                       unit
    ===================  ==========================  ========
    ``forces``           max_i ‖σ_F,i‖               eV/Å
    ``energy``           σ_E                         eV
    ``energy_per_atom``  σ_E / N                     eV/atom
    ===================  ==========================  ========

    A value over the threshold (or not finite) is "uncertain": ``on_uncertain``
    ``"stop"`` raises `StopMD`, which `run_md` turns into a clean early end (with
    ASE dynamics used directly, it propagates to the caller); ``"record"`` keeps a
    copy of the structure and goes on. Either way the structure is appended to
    ``recorded`` and, if ``record_to`` is given, to that extended-XYZ file.

    Cost: the force uncertainty comes from the last-layer ensemble, so each check
    evaluates the model once more at the same geometry with min(M, F) extra
    backward passes (M members, F last-layer features), a few MD steps' worth.
    ``interval`` spreads that cost; the energy uncertainty alone would be free.

    Parameters
    ----------
    max_uncertainty
        Threshold in the unit of ``measure``; None only logs (and tracks
        ``max_seen``).
    measure
        ``"forces"``, ``"energy"`` or ``"energy_per_atom"`` (table above).
    on_uncertain
        ``"stop"`` or ``"record"``.
    record_to
        A ``.xyz``/``.extxyz`` file that uncertain structures are appended to (and
        flushed), with the model's energy and forces and ``uncertainty``,
        ``uncertainty_measure`` and ``step`` in the info line. Existing content
        is kept, so several runs can collect into one file.
    log
        A table of step, time_fs, energy_uncertainty_eV and
        max_force_uncertainty_eV/A, one row per check: comma-separated for a
        ``.csv`` file, otherwise whitespace-separated with a ``#`` header
        (``numpy.loadtxt`` reads both). Overwritten by the first check.
    interval
        Check at steps that are multiples of ``interval`` (``dynamics.nsteps``),
        whatever interval the watch is attached with.

    Attributes
    ----------
    max_seen
        Largest measured value so far (NaN before the first check).
    first_exceeded_step
        First step with an uncertain structure, or None.
    num_checks
        Checks done so far.
    recorded
        Copies of the uncertain structures, with a ``SinglePointCalculator``
        holding energy and forces and ``info["uncertainty"]`` (the measured
        value), ``info["uncertainty_measure"]`` and ``info["step"]``.
    history
        One ``(step, energy_uncertainty_eV, max_force_uncertainty_eV_per_A)``
        per check (the force value is NaN for an LLPR model without ensemble
        members and a measure other than ``forces``).

    Examples
    --------
    >>> watch = UncertaintyWatch(0.5, measure="forces", interval=5)
    >>> watch.max_seen, watch.num_checks, watch.first_exceeded_step
    (nan, 0, None)

    With ``run_md`` (a bare watch is attached with its interval), or with ASE
    dynamics, which must pass itself to the watch:

    >>> summary = run_md(atoms, llpr_model, observers=[watch])  # doctest: +SKIP
    >>> dynamics.attach(watch, watch.interval, dynamics)  # doctest: +SKIP
    """

    def __init__(
        self,
        max_uncertainty: float | None = None,
        *,
        measure: str = "forces",
        on_uncertain: str = "stop",
        record_to: str | os.PathLike | None = None,
        log: str | os.PathLike | None = None,
        interval: int = 1,
    ):
        if measure not in UNCERTAINTY_MEASURES:
            raise ValueError(
                f"unknown uncertainty measure {measure!r}; choose one of "
                f"{tuple(UNCERTAINTY_MEASURES)}"
            )
        if on_uncertain not in ON_UNCERTAIN:
            raise ValueError(
                f"unknown on_uncertain {on_uncertain!r}; choose one of {ON_UNCERTAIN}"
            )
        if isinstance(interval, bool) or not isinstance(interval, (int, np.integer)):
            raise ValueError(f"interval must be an integer ≥ 1, got {interval!r}")
        if interval < 1:
            raise ValueError(f"interval must be ≥ 1, got {interval}")
        if max_uncertainty is not None and not max_uncertainty >= 0:  # NaN too
            raise ValueError(
                f"max_uncertainty must be ≥ 0 {UNCERTAINTY_MEASURES[measure]} or "
                f"None, got {max_uncertainty}"
            )
        if record_to is not None and Path(record_to).suffix.lower() not in (
            ".xyz", ".extxyz",
        ):
            raise ValueError(f"record_to {record_to}: use a .xyz or .extxyz file")
        self.max_uncertainty = (
            None if max_uncertainty is None else float(max_uncertainty)
        )
        self.measure = measure
        self.on_uncertain = on_uncertain
        self.record_to = None if record_to is None else Path(record_to)
        self.log = None if log is None else Path(log)
        self.interval = int(interval)
        self.max_seen = math.nan
        self.first_exceeded_step: int | None = None
        self.num_checks = 0
        self.recorded: list[ase.Atoms] = []
        self.history: list[tuple[int, float, float]] = []
        # (step, measured value, uncertain?) per check, for run_md's summary
        self._checks: list[tuple[int, float, bool]] = []
        # files open on the first check, so a watch that never runs leaves none open
        self._log_handle: TextIO | None = None
        self._log_started = False
        self._record_handle: TextIO | None = None
        # a calculator seen to lack the force ensemble (LLPR with 0 members)
        self._no_force_ensemble: Any = None

    def __call__(self, dynamics: MolecularDynamics) -> None:
        """Check the structure of ``dynamics`` if its step is a multiple of
        ``interval``; raises `StopMD` on an uncertain one with ``"stop"``."""
        step = int(dynamics.nsteps)
        if step % self.interval:
            return
        atoms = dynamics.atoms
        energy_sigma, force_sigma = self._read(atoms)
        value = {
            "forces": force_sigma,
            "energy": energy_sigma,
            "energy_per_atom": energy_sigma / len(atoms),
        }[self.measure]
        # not finite means a broken prediction: treat it as uncertain, not as fine
        uncertain = self.max_uncertainty is not None and not (
            value <= self.max_uncertainty
        )
        self.num_checks += 1
        self.max_seen = float(np.fmax(self.max_seen, value))
        self.history.append((step, energy_sigma, force_sigma))
        self._checks.append((step, value, uncertain))
        get_time = getattr(dynamics, "get_time", None)
        time_fs = get_time() / units.fs if get_time is not None else math.nan
        self._write_log(step, time_fs, energy_sigma, force_sigma)
        if not uncertain:
            return
        if self.first_exceeded_step is None:
            self.first_exceeded_step = step
        self._record(atoms, step, value)
        if self.on_uncertain == "stop":
            unit = UNCERTAINTY_MEASURES[self.measure]
            raise StopMD(
                f"{self.measure} uncertainty {value:.4g} {unit} over max_uncertainty "
                f"{self.max_uncertainty:g} {unit} at step {step}"
            )

    def close(self) -> None:
        """Close the log and the record file (a later check reopens them, appending)."""
        for handle in (self._log_handle, self._record_handle):
            if handle is not None:
                handle.close()
        self._log_handle = self._record_handle = None

    def __enter__(self) -> UncertaintyWatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _read(self, atoms: ase.Atoms) -> tuple[float, float]:
        """(σ_E in eV, max_i ‖σ_F,i‖ in eV/Å) of ``atoms`` from its calculator."""
        calc = atoms.calc
        if calc is None or getattr(calc, "is_llpr", True) is False:
            raise PropertyNotImplementedError(self._needs_llpr(calc))
        force_sigma = math.nan
        if calc is not self._no_force_ensemble:
            try:
                # (N, 3); asking again at the same geometry runs the model once more
                sigma = np.asarray(calc.get_property("forces_uncertainty", atoms))
                force_sigma = float(np.linalg.norm(sigma, axis=1).max(initial=0.0))
            except PropertyNotImplementedError as error:
                is_llpr = bool(getattr(calc, "is_llpr", False))
                if not is_llpr or self.measure == "forces":
                    raise PropertyNotImplementedError(
                        self._needs_llpr(calc, ensemble=is_llpr)
                    ) from error
                self._no_force_ensemble = calc  # don't pay for the attempt again
        try:
            energy_sigma = float(calc.get_property("energy_uncertainty", atoms))
        except PropertyNotImplementedError as error:
            raise PropertyNotImplementedError(self._needs_llpr(calc)) from error
        return energy_sigma, force_sigma

    def _needs_llpr(self, calc: Any, ensemble: bool = False) -> str:
        what = "an LLPR model with ensemble members" if ensemble else "an LLPR model"
        if calc is None:
            got = "no calculator"
        elif getattr(calc, "is_llpr", None) is False:
            got = f"{type(calc).__name__} of a model without LLPR"
        elif ensemble:
            got = "an LLPR model without ensemble members (num_ensemble_members 0)"
        else:
            got = f"{type(calc).__name__}, which has no uncertainties"
        return (
            f"UncertaintyWatch (measure {self.measure!r}) needs {what}: a "
            "PESCalculator of a model wrapped with pes_calc.llpr.wrap or trained "
            f"with architecture name llpr; got {got}"
        )

    def _write_log(
        self, step: int, time_fs: float, energy_sigma: float, force_sigma: float
    ) -> None:
        if self.log is None:
            return
        csv = self.log.suffix.lower() == ".csv"
        separator = "," if csv else " "
        if self._log_handle is None:
            # the first check starts the table; after close() rows are appended
            mode = "a" if self._log_started else "w"
            self._log_handle = open(self.log, mode)  # noqa: SIM115 (close())
            if not self._log_started:
                header = separator.join(_UNCERTAINTY_LOG_COLUMNS)
                self._log_handle.write(f"{header}\n" if csv else f"# {header}\n")
            self._log_started = True
        row = [f"{step:d}", f"{time_fs:.4f}", f"{energy_sigma:.8g}",
               f"{force_sigma:.8g}"]
        self._log_handle.write(separator.join(row) + "\n")
        self._log_handle.flush()

    def _record(self, atoms: ase.Atoms, step: int, value: float) -> None:
        from ase.calculators.singlepoint import SinglePointCalculator

        copy = atoms.copy()
        # the model's values at this geometry (cached: no new evaluation)
        copy.calc = SinglePointCalculator(
            copy, energy=atoms.get_potential_energy(), forces=atoms.get_forces()
        )
        copy.info.update(uncertainty=value, uncertainty_measure=self.measure, step=step)
        self.recorded.append(copy)
        if self.record_to is None:
            return
        import ase.io

        if self._record_handle is None:
            self._record_handle = open(self.record_to, "a")  # noqa: SIM115 (close())
        ase.io.write(self._record_handle, copy, format="extxyz")
        self._record_handle.flush()

    def _since(self, start: int) -> tuple[float, int | None]:
        """(largest value, first uncertain step) over the checks from ``start`` on."""
        checks = self._checks[start:]
        largest = float(np.fmax.reduce([v for _, v, _ in checks], initial=math.nan))
        first = next((step for step, _, uncertain in checks if uncertain), None)
        return largest, first
