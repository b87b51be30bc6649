"""`LLPR`: last-layer prediction rigidity uncertainties for any trained `Potential`.

Each architecture writes per-atom energies as e_i = f_i · w, and the potential
scales them by σ_t, so the per-atom energy depends on the last-layer weights w
through the features g_i = σ_{t(i)} f_i. With F the feature matrix of the training
set and ς the regulariser (Bigi et al., Eq. 24):

| quantity | key | formula |
|---|---|---|
| covariance | `covariance` | C = Σ_s (g_s / n_s)(g_s / n_s)ᵀ, training structures s |
| factor | `inverse_cholesky` | L⁻¹, with C + ς² I = L Lᵀ (float64) |
| per-structure σ_E | `energy_uncertainty` | √((wα‖L⁻¹g_s‖)² + a² mean_k (g_s·Δw_k)²) |
| per-atom σ_i | `energies_uncertainty` | the same with g_i for g_s |
| ensemble members | `ensemble_displacements` | Δw_k = α L⁻ᵀ z_k, z_k ~ N(0, I) |
| ensemble energies | `energy_ensemble` | E + g_s · Δw_k |
| ensemble forces | `forces_ensemble` | F - β ∂(g_s · Δw_k)/∂R |
| σ of forces | `forces_uncertainty` | √(mean_k (F_k - F)²) |

g_s = Σ_{i in s} g_i, and Δw_k are centred (mean over k zero). Each property is
calibrated on its own: the energies on the validation energies, and the force
factor β (`force_scale`) on the validation forces, so that the force α is α β.
β = 1 leaves the members' forces as sampled (files written before β existed).

The energy σ has two sources (``llpr.energy_uncertainty`` in the file's settings):
``analytic``, α ‖L⁻¹ g_s‖ (w = `analytic_energy_weight` = 1, a =
`ensemble_energy_multiplier` = 0: metatrain's LLPR, and every file written before
the choice existed), or ``ensemble``, a times the spread of the ensemble's
energies (w = 0), which after ensemble training carries what the members learnt
from the training forces and energies. `pes_calc.train.llpr` picks the one with
the lower validation NLL.

The covariance uses per-atom-normalised structure features, matching a loss on
energy per atom; σ_E of the total energy is then α ‖L⁻¹ g_s‖ = n σ_{E/n}, so
covariance, calibration and inference share one normalisation. The ensemble
displacements are centred on use, so the ensemble mean is always the model's
prediction (shifts, composition and ZBL included). Units: eV, eV/Å.

This module is the runtime model only. Fitting (`fit_covariance`, `factorise`,
`calibrate`, `sample_ensemble`, `wrap`) runs once after training, one pass over
the data each, and lives in `pes_calc.train.llpr`; `pes_calc.train` drives it.
"""

import copy
import importlib
import warnings
from typing import Any, Dict, List

import torch
from torch import Tensor, nn

from pes_calc import keys
from pes_calc.graph import AtomicGraph, sum_per_structure
from pes_calc.potential import Potential, _or_zeros

# fitting and calibration names that moved to pes_calc.train.llpr; importing
# them from here still works, with a DeprecationWarning, for one release
_MOVED_TO_TRAIN = frozenset(
    {
        "CALIBRATION_METHODS",
        "FACTOR_TOLERANCE",
        "SMALLEST_REGULARIZER",
        "_batches",
        "_crps_minimum",
        "_energy_and_structure_features",
        "_model_dtype",
        "calibrate",
        "calibration_factor",
        "factorise",
        "fit_covariance",
        "gaussian_crps",
        "raw_energy_errors",
        "sample_ensemble",
        "wrap",
    }
)
# and the linearised ensemble, to pes_calc.train.llpr_ensemble
_MOVED_TO_ENSEMBLE = frozenset({"_CACHED", "LinearisedEnsemble", "linearise"})


class Float64State(nn.Module):
    """LLPR's fitted tensors, kept in float64 whatever dtype the model is cast to
    (``.to(dtype)`` moves them between devices only): the covariance of a float32
    model's features spans more decades than float32 holds."""

    covariance: Tensor
    inverse_cholesky: Tensor
    multiplier: Tensor
    force_scale: Tensor
    regularizer: Tensor
    analytic_energy_weight: Tensor
    ensemble_energy_multiplier: Tensor

    def __init__(self, num_features: int, num_members: int):
        super().__init__()
        f64 = torch.float64
        self.register_buffer(
            "covariance", torch.zeros(num_features, num_features, dtype=f64)
        )
        self.register_buffer("inverse_cholesky", torch.eye(num_features, dtype=f64))
        self.register_buffer("multiplier", torch.ones((), dtype=f64))
        self.register_buffer("force_scale", torch.ones((), dtype=f64))
        self.register_buffer("regularizer", torch.zeros((), dtype=f64))
        # energy σ: w α ‖L⁻¹ g‖ (analytic) and a × the ensemble's spread, in
        # quadrature; (w, a) = (1, 0) is the analytic σ alone
        self.register_buffer("analytic_energy_weight", torch.ones((), dtype=f64))
        self.register_buffer("ensemble_energy_multiplier", torch.zeros((), dtype=f64))
        self.ensemble_displacements = nn.Parameter(
            torch.zeros(num_features, num_members, dtype=f64), requires_grad=False
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # files from before per-property calibration have no force factor: β = 1
        # gives their forces exactly as before; files from before the choice of
        # energy σ have the analytic one, (w, a) = (1, 0), exactly as before
        defaults = {
            "force_scale": 1.0,
            "analytic_energy_weight": 1.0,
            "ensemble_energy_multiplier": 0.0,
        }
        for name, value in defaults.items():
            state_dict.setdefault(
                prefix + name, torch.full((), value, dtype=torch.float64)
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 (torch's signature)
        def device_of(tensor: Tensor) -> torch.device:
            return fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device)).device

        for name, buffer in self._buffers.items():
            if buffer is not None:
                self._buffers[name] = buffer.to(device_of(buffer))
        for parameter in self._parameters.values():
            if parameter is not None:
                parameter.data = parameter.data.to(device_of(parameter))
        return self


class LLPR(nn.Module):
    """A trained `Potential` with LLPR uncertainties and a last-layer ensemble.

    Outputs (`pes_calc.keys`): the potential's, plus ``energy_uncertainty`` (S,),
    ``energies_uncertainty`` (N,), and with ensemble members ``energy_ensemble``
    (S, M), ``forces_ensemble`` (M, N, 3) and ``forces_uncertainty`` (N, 3), all
    standard deviations in eV and eV/Å. Ensemble forces cost min(M, F) extra
    backward passes; set ``ensemble_forces = False`` to skip them.
    """

    __jit_ignored_attributes__ = ["config"]
    __jit_unused_properties__ = ["do_derivatives"]

    def __init__(self, potential: Potential, num_ensemble_members: int = 0):
        super().__init__()
        if num_ensemble_members < 0:
            raise ValueError("num_ensemble_members must be ≥ 0")
        self.potential = potential
        self.species: List[str] = list(potential.species)
        self.cutoff: float = potential.cutoff
        self.num_features: int = int(potential.architecture.last_layer.weight.shape[1])
        self.num_ensemble_members: int = int(num_ensemble_members)
        self.state = Float64State(self.num_features, self.num_ensemble_members)
        self.ensemble_forces: bool = True
        # the wrapped model's config plus "llpr" settings; the potential keeps its own
        self.config: dict = copy.deepcopy(potential.config)

    @property
    def do_derivatives(self) -> bool:
        return self.potential.do_derivatives

    @do_derivatives.setter
    def do_derivatives(self, value: bool) -> None:
        self.potential.do_derivatives = value

    def llpr_features(self, last_layer_features: Tensor, species: Tensor) -> Tensor:
        """(N, F) g_i = σ_t f_i: the derivative of E_i with respect to w."""
        scales = self.potential.per_type_energy_scales[species]
        return last_layer_features * scales.to(last_layer_features.dtype).unsqueeze(-1)

    def centred_displacements(self) -> Tensor:
        """(F, M) float64 Δw_k minus their mean: the ensemble mean is the model."""
        # float64 even in a TorchScript model cast with .to(dtype)
        displacements = self.state.ensemble_displacements.to(torch.float64)
        return displacements - displacements.mean(dim=1, keepdim=True)

    def forward(
        self,
        graph: AtomicGraph,
        compute_forces: bool = True,
        compute_stress: bool = True,
    ) -> Dict[str, Tensor]:
        potential = self.potential
        compute_forces = compute_forces and potential.do_derivatives
        compute_stress = compute_stress and potential.do_derivatives
        with_ensemble = self.num_ensemble_members > 0
        ensemble_forces = compute_forces and self.ensemble_forces and with_ensemble
        outputs, positions, strain = potential.predict_energies(
            graph, compute_forces, compute_stress
        )
        energy = outputs[keys.ENERGY]
        dtype = energy.dtype
        atom_features = self.llpr_features(
            outputs[keys.LAST_LAYER_FEATURES], graph.species
        )
        structure_features = sum_per_structure(atom_features, graph)  # (S, F)

        inverse = self.state.inverse_cholesky.to(torch.float64)
        alpha = self.state.multiplier.to(torch.float64)
        alpha = alpha * self.state.analytic_energy_weight.to(torch.float64)
        atom_sigma = alpha * torch.linalg.vector_norm(
            atom_features.to(torch.float64) @ inverse.T, dim=-1
        )
        structure_sigma = alpha * torch.linalg.vector_norm(
            structure_features.to(torch.float64) @ inverse.T, dim=-1
        )
        displacements = self.centred_displacements()
        if with_ensemble:
            shifts = structure_features.to(torch.float64) @ displacements  # (S, M)
            outputs[keys.ENERGY_ENSEMBLE] = energy.unsqueeze(-1) + shifts.to(dtype)
            # hypot(x, 0) = |x| exactly: a = 0 leaves the analytic σ bit for bit
            scale = self.state.ensemble_energy_multiplier.to(torch.float64)
            atom_shifts = atom_features.to(torch.float64) @ displacements  # (N, M)
            atom_sigma = torch.hypot(atom_sigma, scale * ensemble_spread(atom_shifts))
            structure_sigma = torch.hypot(
                structure_sigma, scale * ensemble_spread(shifts)
            )
        outputs[keys.ENERGIES_UNCERTAINTY] = atom_sigma.to(dtype)
        outputs[keys.ENERGY_UNCERTAINTY] = structure_sigma.to(dtype)

        outputs = potential.add_derivatives(
            outputs,
            graph,
            positions,
            strain,
            compute_forces,
            compute_stress,
            ensemble_forces,
        )
        if ensemble_forces:
            shifts_gradient = self._ensemble_energy_gradients(
                structure_features, positions, displacements
            ) * self.state.force_scale.to(dtype)  # (M, N, 3), calibrated on forces
            forces = outputs[keys.FORCES]
            forces_ensemble = forces.unsqueeze(0) - shifts_gradient
            outputs[keys.FORCES_ENSEMBLE] = forces_ensemble
            outputs[keys.FORCES_UNCERTAINTY] = torch.sqrt(
                torch.mean(shifts_gradient * shifts_gradient, dim=0)
            )
        return outputs

    def _ensemble_energy_gradients(
        self, structure_features: Tensor, positions: Tensor, displacements: Tensor
    ) -> Tensor:
        """(M, N, 3) ∂(g_s · Δw_k)/∂R, from min(M, F) backward passes: one per
        member, or one per feature (the Jacobian of g_s) when F < M."""
        dtype = structure_features.dtype
        if displacements.shape[1] <= self.num_features:
            return column_gradients(
                structure_features @ displacements.to(dtype), positions, self.training
            )
        # (F, N, 3)
        jacobian = column_gradients(structure_features, positions, self.training)
        product = torch.einsum("fna,fm->mna", jacobian.to(torch.float64), displacements)
        return product.to(dtype)


def ensemble_spread(shifts: Tensor) -> Tensor:
    """(K,) √(mean_k shifts[:, k]²): the spread of centred members' values."""
    return torch.sqrt(torch.mean(shifts * shifts, dim=1))


def column_gradients(targets: Tensor, positions: Tensor, create_graph: bool) -> Tensor:
    """(K, N, 3) ∂(Σ_s targets[s, k])/∂R for each column k of ``targets`` (S, K):
    one backward pass per column (zeros where a column does not depend on R)."""
    count = targets.shape[1]
    rows: List[Tensor] = []
    for index in range(count):
        gradient = torch.autograd.grad(
            [targets[:, index].sum()],
            [positions],
            retain_graph=create_graph or index < count - 1,
            create_graph=create_graph,
            allow_unused=True,
        )[0]
        rows.append(_or_zeros(gradient, positions))
    return torch.stack(rows)


def __getattr__(name: str) -> Any:
    """A name that moved to `pes_calc.train`, with a DeprecationWarning."""
    if name in _MOVED_TO_TRAIN:
        module = "pes_calc.train.llpr"
    elif name in _MOVED_TO_ENSEMBLE:
        module = "pes_calc.train.llpr_ensemble"
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # imported on first use: pes_calc.train imports this module
    fitting = importlib.import_module(module)
    warnings.warn(
        DeprecationWarning(f"pes_calc.llpr.{name} moved to {module}.{name}"),
        stacklevel=2,
    )
    return getattr(fitting, name)
