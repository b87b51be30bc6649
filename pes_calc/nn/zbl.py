"""Ziegler–Biersack–Littmark (ZBL) screened nuclear repulsion, a short-range baseline.

| symbol | code | meaning |
|---|---|---|
| E_ij = k Z_i Z_j / r φ(r/a) u(r/r_c) | `pair_energies` | pair energy |
| | | (eV or kcal/mol) |
| k | `coulomb_constant` | e²/(4πε₀): 14.3996 eV·Å (metal) or |
| | | 332.0637 kcal/mol·Å (real) |
| a = 0.46850 / | `screening_length` | universal screening length, Å |
| (Z_i^0.23 + Z_j^0.23) | | |
| φ(x) = Σ c_k exp(-d_k x) | `phi` | universal screening function |
| u | `polynomial_envelope` (p=6) | smooth switch-off at r_c = covalent radius sum |
"""

from typing import Sequence

import torch
from ase.data import atomic_numbers, covalent_radii
from torch import Tensor, nn

from pes_calc.nn.cutoffs import polynomial_envelope

COULOMB_CONSTANT = {"metal": 14.399645478425668, "real": 332.06371}
PHI_COEFFICIENTS = (0.18175, 0.50986, 0.28022, 0.02817)
PHI_EXPONENTS = (3.19980, 0.94229, 0.40290, 0.20162)


class ZBL(nn.Module):
    """ZBL pair energies for edges between atoms of the given species.

    Each pair is switched off smoothly at the sum of the two covalent radii (never
    beyond the model's ``cutoff``), so ZBL acts only at close contact.
    """

    def __init__(self, species: Sequence[str], cutoff: float, units: str = "metal"):
        super().__init__()
        if units not in COULOMB_CONSTANT:
            raise ValueError(f"ZBL units must be 'metal' or 'real', not {units!r}")
        self.units = units
        self.coulomb_constant = COULOMB_CONSTANT[units]
        numbers = torch.tensor(
            [atomic_numbers[s] for s in species], dtype=torch.float64
        )
        radii = torch.tensor([covalent_radii[atomic_numbers[s]] for s in species])
        for name, values in [
            ("phi_coefficients", PHI_COEFFICIENTS),
            ("phi_exponents", PHI_EXPONENTS),
        ]:
            tensor = torch.tensor(values, dtype=torch.float64)
            self.register_buffer(name, tensor, persistent=False)
        self.register_buffer("atomic_numbers", numbers, persistent=False)
        pair_range = torch.clamp(radii[:, None] + radii[None, :], max=cutoff)
        self.register_buffer(
            "pair_range", pair_range.to(torch.float64), persistent=False
        )

    def forward(self, lengths: Tensor, species_i: Tensor, species_j: Tensor) -> Tensor:
        """Pair energies (E,) for edge ``lengths`` (E,) in Å."""
        z_i = self.atomic_numbers[species_i].to(lengths.dtype)
        z_j = self.atomic_numbers[species_j].to(lengths.dtype)
        screening_length = 0.46850 / (torch.pow(z_i, 0.23) + torch.pow(z_j, 0.23))
        x = lengths / screening_length
        coefficients = self.phi_coefficients.to(x.dtype)
        exponents = self.phi_exponents.to(x.dtype)
        phi = (coefficients * torch.exp(-exponents * x.unsqueeze(-1))).sum(-1)
        pair_range = self.pair_range[species_i, species_j].to(lengths.dtype)
        switch = polynomial_envelope(lengths / pair_range, 1.0, 6.0)
        return self.coulomb_constant * z_i * z_j / lengths * phi * switch
