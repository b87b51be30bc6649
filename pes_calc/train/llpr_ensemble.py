"""The LLPR ensemble of a frozen model, linearised: what ensemble training runs on.

With the backbone frozen, the members' energies and forces are linear in their
last-layer displacements, so `linearise` caches each graph's energy, forces,
stress, structure features g_s and their Jacobian once, and `LinearisedEnsemble`
trains the displacements on those caches without running the model again.
Units: eV, eV/Å.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pes_calc import keys
from pes_calc.graph import AtomicGraph, graph_to, sum_per_structure
from pes_calc.llpr import LLPR, column_gradients
from pes_calc.train.llpr import _model_dtype

__all__ = ["LinearisedEnsemble", "linearise"]

# keys of the per-graph cache `linearise` adds to graph.properties
_CACHED = (
    "llpr_energy",
    "llpr_forces",
    "llpr_stress",
    "llpr_structure_features",
    "llpr_feature_jacobian",
)


def linearise(
    llpr: LLPR,
    graphs: Sequence[AtomicGraph],
    compute_stress: bool,
    device: torch.device | str = "cpu",
) -> list[AtomicGraph]:
    """Copies of ``graphs`` whose properties also hold what a frozen model gives
    them: energy, forces, stress, structure features g_s (S, F) and their
    Jacobian ∂g_s/∂R stored per atom (N, F, 3). With the backbone frozen, the
    ensemble's energies and forces are linear in the displacements, so
    `LinearisedEnsemble` can train them without running the model again."""
    device = torch.device(device)
    dtype = _model_dtype(llpr)
    result = []
    for graph in graphs:
        graph = graph._replace(
            properties={k: v for k, v in graph.properties.items() if k not in _CACHED}
        )
        moved = graph_to(graph, device, dtype)
        outputs, positions, strain = llpr.potential.predict_energies(
            moved, True, compute_stress
        )
        features = llpr.llpr_features(outputs[keys.LAST_LAYER_FEATURES], moved.species)
        structure_features = sum_per_structure(features, moved)  # (1, F)
        outputs = llpr.potential.add_derivatives(
            outputs, moved, positions, strain, True, compute_stress, True
        )
        # stored per atom (N, F, 3) so that batching concatenates along atoms
        jacobian = column_gradients(structure_features, positions, False)
        jacobian = jacobian.transpose(0, 1)
        cache = {
            "llpr_energy": outputs[keys.ENERGY],
            "llpr_forces": outputs[keys.FORCES],
            "llpr_structure_features": structure_features,
            "llpr_feature_jacobian": jacobian,
        }
        if compute_stress:
            cache["llpr_stress"] = outputs[keys.STRESS]
        properties = dict(graph.properties)
        properties.update({k: v.detach().to("cpu") for k, v in cache.items()})
        result.append(graph._replace(properties=properties))
    return result


class LinearisedEnsemble(nn.Module):
    """The LLPR ensemble of a frozen model, evaluated on `linearise`d graphs:
    energy_ensemble = E + g_s · Δw_k, forces_ensemble = F - (∂g_s/∂R) · Δw_k.
    Only ``llpr.state.ensemble_displacements`` is trained through it."""

    def __init__(self, llpr: LLPR):
        super().__init__()
        self.llpr = llpr

    def forward(
        self,
        graph: AtomicGraph,
        compute_forces: bool = True,
        compute_stress: bool = True,
    ) -> dict[str, Tensor]:
        properties = graph.properties
        displacements = self.llpr.centred_displacements()
        energy = properties["llpr_energy"]
        features = properties["llpr_structure_features"].to(torch.float64)
        shifts = (features @ displacements).to(energy.dtype)  # (S, M)
        outputs = {
            keys.ENERGY: energy,
            keys.ENERGY_ENSEMBLE: energy.unsqueeze(-1) + shifts,
        }
        if compute_forces:
            forces = properties["llpr_forces"]
            deviations = torch.einsum(
                "nfa,fm->mna",
                properties["llpr_feature_jacobian"].to(torch.float64),
                displacements,
            ) * self.llpr.state.force_scale.to(torch.float64)  # as LLPR.forward
            outputs[keys.FORCES] = forces
            outputs[keys.FORCES_ENSEMBLE] = forces.unsqueeze(0) - deviations.to(
                forces.dtype
            )
        if compute_stress and "llpr_stress" in properties:
            outputs[keys.STRESS] = properties["llpr_stress"]
        return outputs
