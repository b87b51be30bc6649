"""Names of model outputs and calculator results, with shapes and units.

N atoms, S structures, F last-layer features, M ensemble members.
"""

from typing import Final

ENERGY: Final[str] = "energy"
"""(S,) structure energies, eV."""
ENERGIES: Final[str] = "energies"
"""(N,) per-atom energies, eV."""
FORCES: Final[str] = "forces"
"""(N, 3) forces -dE/dR, eV/Å."""
STRESS: Final[str] = "stress"
"""(S, 3, 3) stress (1/V) dE/dε, eV/Å³ (ASE sign); the calculator returns Voigt 6."""
LAST_LAYER_FEATURES: Final[str] = "last_layer_features"
"""(N, F) per-atom inputs of the architecture's final linear readout."""
ENERGY_UNCERTAINTY: Final[str] = "energy_uncertainty"
"""(S,) standard deviation of the structure energy, eV."""
ENERGIES_UNCERTAINTY: Final[str] = "energies_uncertainty"
"""(N,) standard deviation of per-atom energies, eV."""
FORCES_UNCERTAINTY: Final[str] = "forces_uncertainty"
"""(N, 3) standard deviation of forces over the ensemble, eV/Å."""
ENERGY_ENSEMBLE: Final[str] = "energy_ensemble"
"""(S, M) structure energies of the ensemble members, eV."""
FORCES_ENSEMBLE: Final[str] = "forces_ensemble"
"""(M, N, 3) forces of the ensemble members, eV/Å."""
