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

Modules: `pes_calc.md.run` (`run_md`, `MDSummary`), `pes_calc.md.dynamics` (the
integrators and `maxwell_boltzmann_velocities`), `pes_calc.md.observers` (`StopMD`,
the trajectory writer and the log) and `pes_calc.md.uncertainty` (`UncertaintyWatch`).
"""

from pes_calc.md.dynamics import (
    ENSEMBLES,
    THERMOSTATS,
    Ensemble,
    Thermostat,
    maxwell_boltzmann_velocities,
)
from pes_calc.md.observers import Observer, StopMD
from pes_calc.md.run import MDSummary, run_md
from pes_calc.md.uncertainty import ON_UNCERTAIN, UNCERTAINTY_MEASURES, UncertaintyWatch

__all__ = [
    "ENSEMBLES",
    "ON_UNCERTAIN",
    "THERMOSTATS",
    "UNCERTAINTY_MEASURES",
    "Ensemble",
    "MDSummary",
    "Observer",
    "StopMD",
    "Thermostat",
    "UncertaintyWatch",
    "maxwell_boltzmann_velocities",
    "run_md",
]
