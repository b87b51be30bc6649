"""pes_calc: fast ASE calculators for machine-learned interatomic potentials."""

from pes_calc.build import build_model
from pes_calc.graph import AtomicGraph
from pes_calc.io import load_model, save_model
from pes_calc.potential import Potential

__all__ = [
    "AtomicGraph",
    "PESCalculator",
    "Potential",
    "build_model",
    "load_model",
    "save_model",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # the calculator pulls in ASE's calculator machinery; import it on first use
    if name == "PESCalculator":
        from pes_calc.calculator import PESCalculator

        return PESCalculator
    raise AttributeError(f"module 'pes_calc' has no attribute {name!r}")
