"""pes_calc: fast ASE calculators for machine-learned interatomic potentials.

atoms → `AtomicGraph` (neighbours from vesin) → architecture → `Potential`
(scales, shifts, ZBL, forces and stress) → `PESCalculator` (ASE results).
"""

import os

# PyTorch reads this once, at its first large (≥ 2 MB) CPU allocation, so it counts when
# pes_calc is imported before any big tensor exists: large tensors on transparent huge
# pages make the fresh per-step allocations of a force call up to 3x cheaper. Export
# it as 0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

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
