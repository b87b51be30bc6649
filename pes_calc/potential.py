"""`Potential`: what every architecture shares — scales, shifts, ZBL, sums, derivatives.

An architecture maps a graph to raw per-atom energies e_i and the per-atom features
its last linear layer reads. The potential turns them into physics:

| quantity | code | formula |
|---|---|---|
| per-atom energy E_i | `energies` | σ_{t(i)} e_i + μ_{t(i)} + ½ Σ_j E_ZBL(r_ij) |
| structure energy E | `energy` | Σ_{i in structure} E_i |
| forces F_i | `forces` | -∂E/∂R_i |
| stress σ | `stress` | (1/V) ∂E/∂ε at ε = 0, with R → R(1+ε), cell → cell(1+ε) |

Forces and stress come from one backward pass over (positions, strain); σ and μ are
the per-type energy scales and shifts. Units: eV, Å, eV/Å, eV/Å³ (ASE's stress sign).
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from pes_calc import keys
from pes_calc.graph import (
    AtomicGraph,
    edge_vectors,
    number_of_atoms,
    number_of_structures,
    sum_per_structure,
    with_positions_and_cell,
)
from pes_calc.nn.scatter import scatter_sum
from pes_calc.nn.zbl import ZBL


class Architecture(nn.Module):
    """Interface of an architecture: a graph and its edge vectors in, raw per-atom
    energies (N,) and last-layer features (N, F) out, with e_i = f_i · w for the
    weights w of ``last_layer``, a bias-free ``nn.Linear(F, 1)``."""

    cutoff: float

    def forward(self, graph: AtomicGraph, vectors: Tensor) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError


class Potential(nn.Module):
    """A trained model: architecture + per-type scales/shifts + optional ZBL.

    Call it on an `AtomicGraph` to get a dict of outputs keyed by `pes_calc.keys`.
    The ``config`` (architecture name and hyperparameters) rebuilds it exactly.
    """

    __jit_ignored_attributes__ = ["config"]

    def __init__(
        self,
        architecture: Architecture,
        species: Sequence[str],
        *,
        per_type_energy_scales: Sequence[float] | float = 1.0,
        per_type_energy_shifts: Sequence[float] | float = 0.0,
        per_type_energy_scales_trainable: bool = False,
        per_type_energy_shifts_trainable: bool = False,
        pair_potential: Optional[ZBL] = None,
        do_derivatives: bool = True,
        config: Optional[dict] = None,
    ):
        super().__init__()
        self.architecture = architecture
        self.species: List[str] = list(species)
        self.cutoff: float = float(architecture.cutoff)
        self.do_derivatives = do_derivatives
        self.config: dict = dict(config or {})
        num_species = len(self.species)
        self.per_type_energy_scales = nn.Parameter(
            _per_type(per_type_energy_scales, num_species, "per_type_energy_scales"),
            requires_grad=per_type_energy_scales_trainable,
        )
        self.per_type_energy_shifts = nn.Parameter(
            _per_type(per_type_energy_shifts, num_species, "per_type_energy_shifts"),
            requires_grad=per_type_energy_shifts_trainable,
        )
        self.pair_potential = pair_potential

    def forward(
        self,
        graph: AtomicGraph,
        compute_forces: bool = True,
        compute_stress: bool = True,
    ) -> Dict[str, Tensor]:
        """Energies, and forces and stress unless switched off (or energy-only)."""
        outputs, positions, strain = self.predict_energies(
            graph, compute_forces, compute_stress
        )
        return self.add_derivatives(
            outputs, graph, positions, strain, compute_forces, compute_stress, False
        )

    def predict_energies(
        self,
        graph: AtomicGraph,
        compute_forces: bool = True,
        compute_stress: bool = True,
    ) -> Tuple[Dict[str, Tensor], Tensor, Tensor]:
        """Energies and last-layer features, plus the (positions, strain) leaves
        that `add_derivatives` differentiates against."""
        compute_forces = compute_forces and self.do_derivatives
        compute_stress = compute_stress and self.do_derivatives
        positions = graph.positions
        if (compute_forces or compute_stress) and not positions.requires_grad:
            positions = positions.detach().requires_grad_(True)
        strain = torch.zeros(
            (number_of_structures(graph), 3, 3),
            dtype=positions.dtype,
            device=positions.device,
        ).requires_grad_(compute_stress)
        strained = with_positions_and_cell(
            graph,
            positions
            + torch.bmm(positions.unsqueeze(1), strain[graph.structure_index]).squeeze(
                1
            ),
            graph.cell + torch.bmm(graph.cell, strain),
        )

        vectors = edge_vectors(strained)  # (E, 3)
        energies, features = self.energies_from_vectors(strained, vectors)
        outputs: Dict[str, Tensor] = {
            keys.ENERGY: sum_per_structure(energies, graph),
            keys.ENERGIES: energies,
            keys.LAST_LAYER_FEATURES: features,
        }
        return outputs, positions, strain

    def energies_from_vectors(
        self, graph: AtomicGraph, vectors: Tensor
    ) -> Tuple[Tensor, Tensor]:
        """Per-atom energies E_i (N,), eV, and last-layer features from the (E, 3)
        edge vectors (Å), which may be autograd inputs of their own (per-atom
        virials need ∂E/∂r_ij)."""
        raw_energies, features = self.architecture(graph, vectors)
        energies = (
            raw_energies * self.per_type_energy_scales[graph.species]
            + self.per_type_energy_shifts[graph.species]
        )
        if self.pair_potential is not None:
            energies = energies + self._pair_energies(graph, vectors)
        return energies, features

    def add_derivatives(
        self,
        outputs: Dict[str, Tensor],
        graph: AtomicGraph,
        positions: Tensor,
        strain: Tensor,
        compute_forces: bool,
        compute_stress: bool,
        retain_graph: bool,
    ) -> Dict[str, Tensor]:
        """Forces and stress from one backward pass of the structure energies;
        ``retain_graph`` keeps the autograd graph for further derivatives."""
        compute_forces = compute_forces and self.do_derivatives
        compute_stress = compute_stress and self.do_derivatives
        if not (compute_forces or compute_stress):
            return outputs
        inputs: List[Tensor] = []
        if compute_forces:
            inputs.append(positions)
        if compute_stress:
            inputs.append(strain)
        gradients = torch.autograd.grad(
            [outputs[keys.ENERGY].sum()],
            inputs,
            retain_graph=retain_graph or self.training,
            create_graph=self.training,
            allow_unused=True,
        )
        if compute_forces:
            outputs[keys.FORCES] = -_or_zeros(gradients[0], positions)
        if compute_stress:
            outputs[keys.STRESS] = _stress(_or_zeros(gradients[-1], strain), graph.cell)
        return outputs

    def _pair_energies(self, graph: AtomicGraph, vectors: Tensor) -> Tensor:
        """Per-atom pair-potential energies: half of each full-list edge's energy."""
        pair_potential = self.pair_potential
        assert pair_potential is not None  # checked by the caller
        i, j = graph.edge_index[0], graph.edge_index[1]
        lengths = torch.linalg.vector_norm(vectors, dim=-1)
        pair = pair_potential(lengths, graph.species[i], graph.species[j])
        return 0.5 * scatter_sum(pair, i, number_of_atoms(graph))


def _per_type(value: Sequence[float] | float, num_species: int, name: str) -> Tensor:
    """A (T,) float64 tensor from one value or one value per species."""
    values = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
    if values.numel() == 1:
        return values.repeat(num_species)
    if values.numel() != num_species:
        raise ValueError(
            f"{name} needs one value or one per species ({num_species}), "
            f"got {values.numel()}"
        )
    return values.clone()


def _or_zeros(gradient: Optional[Tensor], like: Tensor) -> Tensor:
    """A gradient that autograd reports as unused (no edges) is zero."""
    if gradient is None:
        return torch.zeros_like(like)
    return gradient


def _stress(strain_gradient: Tensor, cell: Tensor) -> Tensor:
    """(S, 3, 3) symmetric stress from ∂E/∂ε; zero for cells without volume."""
    # the triple product, not det: AOTInductor has no C kernel for det
    volume = torch.abs(
        torch.sum(cell[:, 0] * torch.linalg.cross(cell[:, 1], cell[:, 2]), dim=-1)
    )  # (S,)
    safe_volume = torch.where(volume > 0, volume, torch.ones_like(volume))
    stress = 0.5 * (strain_gradient + strain_gradient.transpose(1, 2))
    stress = stress / safe_volume[:, None, None]
    return torch.where((volume > 0)[:, None, None], stress, torch.zeros_like(stress))
