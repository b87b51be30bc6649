"""pes_calc: fast ASE calculators for machine-learned interatomic potentials.

atoms → `AtomicGraph` (neighbours from vesin) → architecture → `Potential`
(scales, shifts, ZBL, forces and stress) → `PESCalculator` (ASE results).
"""

from pes_calc import _allocation

# before any large tensor exists: see pes_calc/_allocation.py for why and how to opt out
_allocation.use_huge_pages()
_allocation.reuse_freed_memory()

from pes_calc.batched import evaluate
from pes_calc.build import build_model
from pes_calc.calculator import PESCalculator
from pes_calc.graph import AtomicGraph
from pes_calc.io import load_model, save_model
from pes_calc.potential import Potential

__all__ = [
    "AtomicGraph",
    "PESCalculator",
    "Potential",
    "build_model",
    "evaluate",
    "load_model",
    "save_model",
]
__version__ = "0.1.0"
