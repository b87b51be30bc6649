"""pes_calc: fast ASE calculators for machine-learned interatomic potentials.

atoms → `AtomicGraph` (neighbors from vesin) → architecture → `Potential`
(scales, shifts, ZBL, forces and stress) → `PESCalculator` (ASE results) or an
engine (i-PI, LAMMPS). Importing pes_calc changes nothing outside it; the memory
settings the ``pes-calc`` commands use are `reuse_freed_memory`.
"""

from pes_calc._version import __version__
from pes_calc.build import build_model
from pes_calc.calculator import PESCalculator, evaluate
from pes_calc.graph import AtomicGraph
from pes_calc.io import load_model, save_model
from pes_calc.memory import reuse_freed_memory
from pes_calc.potential import Potential

__all__ = [
    "AtomicGraph",
    "PESCalculator",
    "Potential",
    "__version__",
    "build_model",
    "evaluate",
    "load_model",
    "reuse_freed_memory",
    "save_model",
]
