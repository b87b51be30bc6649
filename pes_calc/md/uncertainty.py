"""`UncertaintyWatch`: an MD observer that reads the LLPR uncertainty of the current
structure and stops the run, or records the structure, when it exceeds a threshold.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import IO, Any, TextIO

import ase
import ase.io
import numpy as np
from ase import units
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.singlepoint import SinglePointCalculator
from ase.md.md import MolecularDynamics

from pes_calc.md.observers import StopMD

#: what `UncertaintyWatch` compares with its threshold, and the unit of each
UNCERTAINTY_MEASURES = {"forces": "eV/Å", "energy": "eV", "energy_per_atom": "eV/atom"}
ON_UNCERTAIN = ("stop", "record")
_UNCERTAINTY_LOG_COLUMNS = (
    "step",
    "time_fs",
    "energy_uncertainty_eV",
    "max_force_uncertainty_eV/A",
)


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

    >>> summary = run_md(llpr_model, atoms, observers=[watch])  # doctest: +SKIP
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
            ".xyz",
            ".extxyz",
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
        self._log_handle: IO[str] | None = None
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
            "PESCalculator of a model wrapped with pes_calc.train.llpr.wrap or trained "
            f"with architecture name llpr; got {got}"
        )

    def _write_log(
        self, step: int, time_fs: float, energy_sigma: float, force_sigma: float
    ) -> None:
        if self.log is None:
            return
        csv = self.log.suffix.lower() == ".csv"
        separator = "," if csv else " "
        handle = self._log_handle
        if handle is None:
            # the first check starts the table; after close() rows are appended
            mode = "a" if self._log_started else "w"
            handle = open(self.log, mode)  # noqa: SIM115 (close())
            self._log_handle = handle
            if not self._log_started:
                header = separator.join(_UNCERTAINTY_LOG_COLUMNS)
                handle.write(f"{header}\n" if csv else f"# {header}\n")
            self._log_started = True
        row = [
            f"{step:d}",
            f"{time_fs:.4f}",
            f"{energy_sigma:.8g}",
            f"{force_sigma:.8g}",
        ]
        handle.write(separator.join(row) + "\n")
        handle.flush()

    def _record(self, atoms: ase.Atoms, step: int, value: float) -> None:
        copy = atoms.copy()
        # the model's values at this geometry (cached: no new evaluation)
        copy.calc = SinglePointCalculator(
            copy, energy=atoms.get_potential_energy(), forces=atoms.get_forces()
        )
        copy.info.update(uncertainty=value, uncertainty_measure=self.measure, step=step)
        self.recorded.append(copy)
        if self.record_to is None:
            return
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
