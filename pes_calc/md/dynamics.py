"""The integrators and initial velocities of `run_md`: `maxwell_boltzmann_velocities`
and the ASE dynamics object for each ensemble and thermostat."""

from __future__ import annotations

from typing import Any, Literal

import ase
import numpy as np
from ase import units
from ase.md.langevin import Langevin
from ase.md.md import MolecularDynamics
from ase.md.velocitydistribution import Stationary, ZeroRotation
from ase.md.verlet import VelocityVerlet

Bussi: Any
try:
    from ase.md.bussi import Bussi
except ImportError:  # ASE < 3.24: no Bussi thermostat; only "bussi" fails
    Bussi = None

try:
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:  # ASE < 3.29: the same distribution under its older name
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    def thermalize_momenta(  # type: ignore[misc]  # ASE's newer signature differs
        atoms: ase.Atoms, temperature_K: float, *, rng: np.random.Generator
    ) -> None:
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)


try:
    from ase.md.nose_hoover_chain import IsotropicMTKNPT as _NPT
except ImportError:  # ASE < 3.25
    from ase.md.npt import NPT as _NPT

Ensemble = Literal["nve", "nvt", "npt"]
Thermostat = Literal["langevin", "bussi"]

ENSEMBLES = ("nve", "nvt", "npt")
THERMOSTATS = ("langevin", "bussi")
#: ASE bulk modulus guess used only by the ``ase.md.npt.NPT`` fallback (pfactor)
_FALLBACK_BULK_MODULUS_GPA = 100.0


def maxwell_boltzmann_velocities(
    atoms: ase.Atoms, temperature: float, rng: np.random.Generator
) -> None:
    """Set Maxwell-Boltzmann momenta on ``atoms`` at exactly ``temperature`` (K).

    The momenta are drawn with ``rng``, then the centre-of-mass motion is removed,
    and the rotation too for a non-periodic structure of more than two atoms that
    is not a line; finally they are scaled to exactly ``temperature``.
    """
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
    atoms: ase.Atoms,
    ensemble: str,
    thermostat: str,
    *,
    temperature: float,
    timestep: float,
    friction: float,
    tdamp: float | None,
    pdamp: float | None,
    pressure: float,
    rng: np.random.Generator,
) -> MolecularDynamics:
    """The ASE integrator; timestep, tdamp, pdamp in fs, friction in 1/fs, GPa, K."""
    dt = timestep * units.fs
    tdamp_fs = 100.0 * timestep if tdamp is None else tdamp
    pdamp_fs = 1000.0 * timestep if pdamp is None else pdamp
    if ensemble == "nve":
        return VelocityVerlet(atoms, timestep=dt)
    if ensemble == "nvt" and thermostat == "langevin":
        return Langevin(
            atoms,
            dt,
            temperature_K=temperature,
            friction=friction / units.fs,
            fixcm=False,
            rng=rng,
        )
    if ensemble == "nvt":
        if Bussi is None:
            raise ImportError(
                f"thermostat 'bussi' needs ASE ≥ 3.24 (ase.md.bussi); this is ASE "
                f"{ase.__version__}: use thermostat 'langevin' or update ASE"
            )
        return Bussi(
            atoms, dt, temperature_K=temperature, taut=tdamp_fs * units.fs, rng=rng
        )
    npt_class = _npt_class()
    if npt_class.__name__ == "IsotropicMTKNPT":
        return npt_class(
            atoms,
            dt,
            temperature_K=temperature,
            pressure_au=pressure * units.GPa,
            tdamp=tdamp_fs * units.fs,
            pdamp=pdamp_fs * units.fs,
        )
    # ase.md.npt.NPT (Nose-Hoover + Parrinello-Rahman): pfactor = ptime² B
    return npt_class(
        atoms,
        dt,
        temperature_K=temperature,
        externalstress=pressure * units.GPa,
        ttime=tdamp_fs * units.fs,
        pfactor=(pdamp_fs * units.fs) ** 2 * _FALLBACK_BULK_MODULUS_GPA * units.GPa,
    )


def _npt_class() -> type:
    """``IsotropicMTKNPT``, or ``ase.md.npt.NPT`` on ASE < 3.25 (tests patch this)."""
    return _NPT
