"""Fitting an `LLPR` wrapper: covariance, factorisation, calibration (α on
energies, β on forces), the sampled ensemble, and the choice of energy σ.

After ensemble training (`recalibrate_forces`, which the trainer calls then) the
energy σ is chosen between the analytic α ‖L⁻¹ g_s‖ and a times the trained
ensemble's spread, each calibrated on the validation energies with the run's
calibration method, by the lower validation NLL (`select_energy_uncertainty`).

Each fit runs once after training, one pass over its data set (no derivatives
except in `linearise`); `wrap` runs them in order. The runtime model (`LLPR`,
its formulas and its outputs) is `pes_calc.llpr`. Units: eV, eV/Å.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from pes_calc import keys
from pes_calc.graph import (
    AtomicGraph,
    atoms_per_structure,
    batch_order,
    iterate_batches,
    sum_per_structure,
)
from pes_calc.llpr import LLPR, ensemble_spread
from pes_calc.potential import Potential

__all__ = [
    "CALIBRATION_METHODS",
    "ENERGY_UNCERTAINTIES",
    "FACTOR_TOLERANCE",
    "SMALLEST_REGULARIZER",
    "calibrate",
    "calibrate_energy_ensemble",
    "calibrate_forces",
    "calibration_factor",
    "factorise",
    "fit_covariance",
    "gaussian_crps",
    "raw_energy_errors",
    "raw_force_errors",
    "recalibrate_forces",
    "sample_ensemble",
    "select_energy_uncertainty",
    "wrap",
]

CALIBRATION_METHODS = ("absolute_residuals", "squared_residuals", "crps")
# where the energy σ comes from (``llpr.energy_uncertainty``): α ‖L⁻¹ g_s‖, or a
# times the ensemble's spread; "auto" picks by the validation NLL
ENERGY_UNCERTAINTIES = ("analytic", "ensemble")
# ς for regularizer: null starts here and grows ×10 until the factor is accurate
SMALLEST_REGULARIZER = 1e-20
# max |L⁻¹ (C + ς²I) L⁻ᵀ - I| accepted: with ς² below the rounding level of C,
# Cholesky can succeed on rounding noise and leave a finite but wrong L⁻¹
FACTOR_TOLERANCE = 1e-6


def _batches(
    graphs: Sequence[AtomicGraph],
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Iterator[AtomicGraph]:
    """``graphs`` in batches, in their order, on ``device`` in ``dtype``."""
    order = batch_order(len(graphs), batch_size, shuffle=False)
    return iterate_batches(list(graphs), order, device, dtype)


def _model_dtype(llpr: LLPR) -> torch.dtype:
    """The floating dtype of the wrapped potential's parameters."""
    return next(p for p in llpr.potential.parameters() if p.is_floating_point()).dtype


def _energy_and_structure_features(
    llpr: LLPR, batch: AtomicGraph
) -> tuple[Tensor, Tensor]:
    """(S,) energies and (S, F) float64 g_s, without derivatives."""
    outputs, _, _ = llpr.potential.predict_energies(batch, False, False)
    features = llpr.llpr_features(outputs[keys.LAST_LAYER_FEATURES], batch.species)
    return outputs[keys.ENERGY], sum_per_structure(features.to(torch.float64), batch)


def fit_covariance(
    llpr: LLPR,
    graphs: Sequence[AtomicGraph],
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> Tensor:
    """C = Σ_s (g_s / n_s)(g_s / n_s)ᵀ over ``graphs``: one forward pass each, no
    derivatives. Stored in ``llpr.state.covariance`` and returned."""
    device = torch.device(device)
    dtype = _model_dtype(llpr)
    covariance = torch.zeros_like(llpr.state.covariance)
    with torch.no_grad():
        for batch in _batches(graphs, batch_size, device, dtype):
            _, per_structure = _energy_and_structure_features(llpr, batch)
            per_structure = per_structure / atoms_per_structure(batch).unsqueeze(-1)
            covariance += per_structure.T @ per_structure
    llpr.state.covariance.copy_(covariance)
    return covariance


def factorise(llpr: LLPR, regularizer: float | None = None) -> float:
    """Factorise C + ς² I = L Lᵀ in float64 and store L⁻¹.

    ``regularizer`` None picks the smallest ς = 1e-20 · 10^k for which Cholesky
    succeeds and L⁻¹ reproduces C + ς²I (to `FACTOR_TOLERANCE`). Returns the ς used.
    """
    covariance = llpr.state.covariance.to(torch.float64)
    covariance = 0.5 * (covariance + covariance.T)
    identity = torch.eye(
        covariance.shape[0], dtype=torch.float64, device=covariance.device
    )
    candidates = (
        [float(regularizer)]
        if regularizer is not None
        else [SMALLEST_REGULARIZER * 10.0**k for k in range(40)]
    )
    for value in candidates:
        regularized = covariance + value**2 * identity
        factor, info = torch.linalg.cholesky_ex(regularized)
        if int(info) != 0:
            continue
        inverse = torch.linalg.solve_triangular(factor, identity, upper=False)
        residual = (inverse @ regularized @ inverse.T - identity).abs().max()
        if bool(residual <= FACTOR_TOLERANCE):  # False for inf/NaN too
            llpr.state.inverse_cholesky.copy_(inverse)
            llpr.state.regularizer.fill_(value)
            return value
    if regularizer is not None:
        raise ValueError(
            f"C + ς²I is not positive definite (or too ill-conditioned to factorise "
            f"to {FACTOR_TOLERANCE:g}) with regularizer ς = {regularizer}; "
            "use a larger value or null to choose one"
        )
    raise ValueError("the LLPR covariance could not be factorised for any regularizer")


def raw_energy_errors(
    llpr: LLPR,
    graphs: Sequence[AtomicGraph],
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    source: str = "analytic",
) -> tuple[Tensor, Tensor]:
    """(residuals E_pred - E_ref, uncalibrated σ_E) over structures with an energy
    label, in float64 eV. ``source`` "analytic": σ_E = ‖L⁻¹ g_s‖ (what α scales);
    "ensemble": the spread √(mean_k (g_s · Δw_k)²) of the centred members' energies
    (what a scales)."""
    _check_source(source)
    if source == "ensemble" and llpr.num_ensemble_members == 0:
        raise ValueError("an ensemble energy σ needs ensemble members")
    device = torch.device(device)
    dtype = _model_dtype(llpr)
    residuals, sigmas = [], []
    displacements = llpr.centred_displacements().detach()
    with torch.no_grad():
        for batch in _batches(graphs, batch_size, device, dtype):
            if keys.ENERGY not in batch.properties:
                continue
            energy, per_structure = _energy_and_structure_features(llpr, batch)
            if source == "analytic":
                sigma = torch.linalg.vector_norm(
                    per_structure @ llpr.state.inverse_cholesky.T, dim=-1
                )
            else:
                sigma = ensemble_spread(per_structure @ displacements)
            residual = energy.double() - batch.properties[keys.ENERGY].double()
            labelled = torch.isfinite(residual)
            residuals.append(residual[labelled].cpu())
            sigmas.append(sigma[labelled].cpu())
    if not residuals or sum(r.numel() for r in residuals) == 0:
        raise ValueError("LLPR calibration needs structures with energy labels")
    return torch.cat(residuals), torch.cat(sigmas)


def calibration_factor(residuals: Tensor, sigmas: Tensor, method: str) -> float:
    """α that scales uncalibrated σ to match ``residuals`` (Gaussian errors).

    - ``absolute_residuals``: α = √(π/2) · mean(|r| / σ) (robust to outliers);
    - ``squared_residuals``: α = √(mean(r² / σ²)), the NLL minimum;
    - ``crps``: the α minimising the mean Gaussian CRPS (convex in α).
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(
            f"unknown calibration_method {method!r}; choose from {CALIBRATION_METHODS}"
        )
    residuals = residuals.double()
    sigmas = sigmas.double().clamp_min(1e-300)
    if method == "absolute_residuals":
        return math.sqrt(math.pi / 2) * float(torch.mean(residuals.abs() / sigmas))
    if method == "squared_residuals":
        return math.sqrt(float(torch.mean((residuals / sigmas) ** 2)))
    return _crps_minimum(residuals, sigmas)


def gaussian_crps(residuals: Tensor, sigmas: Tensor) -> Tensor:
    """Mean CRPS of N(0, σ²) predictions for errors r (eV)."""
    u = residuals / sigmas
    pdf = torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(u / math.sqrt(2)))
    return torch.mean(sigmas * (u * (2 * cdf - 1) + 2 * pdf - 1 / math.sqrt(math.pi)))


def _crps_minimum(residuals: Tensor, sigmas: Tensor) -> float:
    """Golden-section search on log α (CRPS is convex in α, so unimodal)."""
    start = math.log(
        max(calibration_factor(residuals, sigmas, "absolute_residuals"), 1e-300)
    )
    low, high = start - 12.0, start + 12.0
    ratio = (math.sqrt(5) - 1) / 2

    def score(log_alpha: float) -> float:
        return float(gaussian_crps(residuals, math.exp(log_alpha) * sigmas))

    a, b = high - ratio * (high - low), low + ratio * (high - low)
    score_a, score_b = score(a), score(b)
    for _ in range(120):
        if score_a < score_b:
            high, b, score_b = b, a, score_a
            a = high - ratio * (high - low)
            score_a = score(a)
        else:
            low, a, score_a = a, b, score_b
            b = low + ratio * (high - low)
            score_b = score(b)
    return math.exp(0.5 * (low + high))


def calibrate(
    llpr: LLPR,
    graphs: Sequence[AtomicGraph],
    method: str = "absolute_residuals",
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> float:
    """Fit α on ``graphs`` (the validation set) and store it, with the analytic
    energy σ α ‖L⁻¹ g_s‖ (w = 1, a = 0); returns α."""
    residuals, sigmas = raw_energy_errors(llpr, graphs, batch_size, device)
    alpha = calibration_factor(residuals, sigmas, method)
    llpr.state.multiplier.fill_(alpha)
    llpr.state.analytic_energy_weight.fill_(1.0)
    llpr.state.ensemble_energy_multiplier.fill_(0.0)
    return alpha


def calibrate_energy_ensemble(
    llpr: LLPR,
    graphs: Sequence[AtomicGraph],
    method: str = "absolute_residuals",
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> float:
    """Fit a on ``graphs`` (the validation set) for the ensemble energy σ, a
    times the members' spread, and store it (w = 0, α kept for the ensemble's
    sampling); returns a."""
    residuals, sigmas = raw_energy_errors(llpr, graphs, batch_size, device, "ensemble")
    usable = sigmas > 0
    if not bool(usable.any()):
        raise ValueError("the ensemble's energies do not spread on these structures")
    scale = calibration_factor(residuals[usable], sigmas[usable], method)
    llpr.state.analytic_energy_weight.fill_(0.0)
    llpr.state.ensemble_energy_multiplier.fill_(scale)
    return scale


def gaussian_nll(residuals: Tensor, sigmas: Tensor) -> float:
    """Mean Gaussian NLL ½ (log(2π σ²) + r²/σ²) (nats for residuals in eV)."""
    residuals, sigmas = residuals.double(), sigmas.double()
    return float(
        torch.mean(
            0.5 * (torch.log(2 * math.pi * sigmas**2) + (residuals / sigmas) ** 2)
        )
    )


def select_energy_uncertainty(
    llpr: LLPR,
    graphs: Sequence[AtomicGraph],
    method: str = "absolute_residuals",
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    source: str = "auto",
) -> str:
    """Calibrate the energy σ on ``graphs`` (the validation set) from ``source``
    ("analytic", "ensemble", or "auto": the one whose calibrated σ has the lower
    mean Gaussian NLL on ``graphs``; analytic without members or on a tie), each
    fitted with ``method``. Recorded in ``llpr.config["llpr"]``:
    ``energy_uncertainty``, ``multiplier``, ``energy_ensemble_multiplier`` (a) and,
    when both were scored, ``energy_validation_nll``. Returns the source used."""
    if source != "auto":
        _check_source(source)
    candidates = [s for s in ENERGY_UNCERTAINTIES if source in ("auto", s)]
    if llpr.num_ensemble_members == 0:
        if source == "ensemble":
            raise ValueError("an ensemble energy σ needs ensemble members")
        candidates = ["analytic"]
    scores: dict[str, float] = {}
    for candidate in candidates:
        residuals, sigmas = raw_energy_errors(
            llpr, graphs, batch_size, device, candidate
        )
        usable = sigmas > 0
        if not bool(usable.any()):
            continue
        factor = calibration_factor(residuals[usable], sigmas[usable], method)
        # a structure the members cannot move would have σ = 0: infinitely bad
        scores[candidate] = (
            gaussian_nll(residuals, factor * sigmas) if bool(usable.all()) else math.inf
        )
    if not scores:
        raise ValueError("no energy σ can be calibrated on these structures")
    chosen = min(scores, key=lambda name: (scores[name], name != "analytic"))
    settings = llpr.config.setdefault("llpr", {})
    if chosen == "analytic":
        settings["multiplier"] = calibrate(llpr, graphs, method, batch_size, device)
    else:
        calibrate_energy_ensemble(llpr, graphs, method, batch_size, device)
    settings["energy_uncertainty"] = chosen
    settings["energy_ensemble_multiplier"] = float(
        llpr.state.ensemble_energy_multiplier
    )
    if len(scores) > 1:
        settings["energy_validation_nll"] = scores
    return chosen


def _check_source(source: str) -> None:
    if source not in ENERGY_UNCERTAINTIES:
        raise ValueError(
            f"unknown energy_uncertainty {source!r}; choose from "
            f"{ENERGY_UNCERTAINTIES} or 'auto'"
        )


def raw_force_errors(
    llpr: LLPR,
    graphs: Sequence[AtomicGraph],
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """(residuals F_pred - F_ref, ensemble σ_F at β = 1) for every labelled force
    component of ``graphs`` with σ_F > 0, float64 eV/Å: what β scales."""
    if llpr.num_ensemble_members == 0:
        raise ValueError("force calibration needs ensemble members")
    device = torch.device(device)
    dtype = _model_dtype(llpr)
    residuals, sigmas = [], []
    switch = llpr.ensemble_forces
    llpr.ensemble_forces = True
    try:
        for batch in _batches(graphs, batch_size, device, dtype):
            if keys.FORCES not in batch.properties:
                continue
            outputs = llpr(batch, compute_forces=True, compute_stress=False)
            scale = llpr.state.force_scale.to(torch.float64)
            sigma = outputs[keys.FORCES_UNCERTAINTY].detach().double() / scale
            residual = (
                outputs[keys.FORCES].detach().double()
                - batch.properties[keys.FORCES].double()
            )
            # a component no member can move (σ = 0, e.g. by symmetry) says
            # nothing about the scale
            usable = torch.isfinite(residual) & (sigma > 0)
            residuals.append(residual[usable].cpu())
            sigmas.append(sigma[usable].cpu())
    finally:
        llpr.ensemble_forces = switch
    if not residuals or sum(r.numel() for r in residuals) == 0:
        raise ValueError("force calibration needs structures with force labels")
    return torch.cat(residuals), torch.cat(sigmas)


def calibrate_forces(
    llpr: LLPR,
    graphs: Sequence[AtomicGraph],
    method: str = "absolute_residuals",
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> float:
    """Fit the force factor β on the force components of ``graphs`` (the
    validation set), with the ensemble as it is now; store it and return it.
    The force α is then α β."""
    residuals, sigmas = raw_force_errors(llpr, graphs, batch_size, device)
    scale = calibration_factor(residuals, sigmas, method)
    llpr.state.force_scale.fill_(scale)
    return scale


def has_force_labels(graphs: Sequence[AtomicGraph]) -> bool:
    """Whether any of ``graphs`` has a finite force label."""
    return any(
        keys.FORCES in graph.properties
        and bool(torch.isfinite(graph.properties[keys.FORCES]).any())
        for graph in graphs
    )


def has_energy_labels(graphs: Sequence[AtomicGraph]) -> bool:
    """Whether any of ``graphs`` has a finite energy label."""
    return any(
        keys.ENERGY in graph.properties
        and bool(torch.isfinite(graph.properties[keys.ENERGY]).any())
        for graph in graphs
    )


def sample_ensemble(llpr: LLPR, seed: int = 0) -> None:
    """Draw Δw_k = α L⁻ᵀ z_k for every member (float64, from ``seed``)."""
    state = llpr.state
    generator = torch.Generator().manual_seed(int(seed))
    z = torch.randn(
        (llpr.num_features, llpr.num_ensemble_members),
        generator=generator,
        dtype=torch.float64,
    ).to(state.inverse_cholesky.device)
    displacements = state.multiplier * (state.inverse_cholesky.T @ z)
    with torch.no_grad():
        state.ensemble_displacements.copy_(displacements)


def wrap(
    potential: Potential,
    num_ensemble_members: int,
    train_graphs: Sequence[AtomicGraph],
    val_graphs: Sequence[AtomicGraph],
    *,
    regularizer: float | None = None,
    calibration_method: str = "absolute_residuals",
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> LLPR:
    """Covariance on ``train_graphs``, factorisation, α on ``val_graphs``' energies,
    an ensemble, and (with members and force labels) its force factor β on
    ``val_graphs``' forces: a ready `LLPR` around ``potential`` (shared, not copied)."""
    llpr = LLPR(potential, num_ensemble_members).to(device).eval()
    fit_covariance(llpr, train_graphs, batch_size, device)
    used = factorise(llpr, regularizer)
    alpha = calibrate(llpr, val_graphs, calibration_method, batch_size, device)
    sample_ensemble(llpr, seed)
    llpr.config["llpr"] = {
        "num_ensemble_members": {"energy": num_ensemble_members},
        "regularizer": used,
        "calibration_method": calibration_method,
        "multiplier": alpha,
    }
    # the sampled members spread as the analytic σ does: the energy σ stays
    # analytic until the ensemble is trained
    recalibrate_forces(
        llpr, val_graphs, calibration_method, batch_size, device, energies=None
    )
    return llpr


def recalibrate_forces(
    llpr: LLPR,
    graphs: Sequence[AtomicGraph],
    method: str,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    energies: str | None = "auto",
) -> None:
    """After the ensemble changed (the trainer calls this after ensemble
    training): `calibrate_forces` where it applies (members and force labels),
    recorded in ``llpr.config["llpr"]`` as ``force_scale`` and the force α
    ``forces_multiplier``; and, unless ``energies`` is None, the energy σ's source
    and factor by `select_energy_uncertainty` with that source ("auto": the lower
    validation NLL)."""
    settings = llpr.config.setdefault("llpr", {})
    if energies is not None and has_energy_labels(graphs):
        select_energy_uncertainty(llpr, graphs, method, batch_size, device, energies)
    if llpr.num_ensemble_members == 0 or not has_force_labels(graphs):
        return
    scale = calibrate_forces(llpr, graphs, method, batch_size, device)
    settings["force_scale"] = scale
    settings["forces_multiplier"] = float(llpr.state.multiplier) * scale
