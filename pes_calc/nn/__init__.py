"""Building blocks shared by the architectures: cutoffs, MLPs, scatter, ZBL, and
long-range electrostatics."""

from pes_calc.nn.cutoffs import polynomial_envelope, shifted_cosine_cutoff
from pes_calc.nn.long_range import LongRangeElectrostatics
from pes_calc.nn.mlp import MLP, PerSpecies, activation, species_groups
from pes_calc.nn.scatter import scatter_sum
from pes_calc.nn.zbl import ZBL

__all__ = [
    "LongRangeElectrostatics",
    "MLP",
    "PerSpecies",
    "ZBL",
    "activation",
    "polynomial_envelope",
    "scatter_sum",
    "species_groups",
    "shifted_cosine_cutoff",
]
