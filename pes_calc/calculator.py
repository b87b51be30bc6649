"""`PESCalculator`: the ASE face of every pes_calc model.

One forward and one backward pass per new geometry fill energy, per-atom energies,
forces and stress together; ASE's own cache serves the other properties. The
neighbour list is built with a Verlet skin and reused until an atom has moved more
than half the skin (or the cell, atoms or species change).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import ase
import numpy as np
import torch
from ase.calculators.calculator import (
    Calculator,
    PropertyNotImplementedError,
    all_changes,
)
from ase.stress import full_3x3_to_voigt_6_stress

from pes_calc import keys
from pes_calc.choices import as_device, as_dtype
from pes_calc.graph import AtomicGraph, edge_vectors
from pes_calc.neighbors import Backend, atoms_to_graph, check_geometry

# LLPR models only; the ensemble-force ones cost extra backward passes
UNCERTAINTY_PROPERTIES = [
    keys.ENERGY_UNCERTAINTY, keys.ENERGIES_UNCERTAINTY, keys.ENERGY_ENSEMBLE,
    keys.FORCES_UNCERTAINTY, keys.FORCES_ENSEMBLE,
]
FORCE_ENSEMBLE_PROPERTIES = (keys.FORCES_UNCERTAINTY, keys.FORCES_ENSEMBLE)


class PESCalculator(Calculator):
    """ASE calculator for pes_calc models.

    Parameters
    ----------
    model
        A model object, or the path of a ``.safetensors`` model or a TorchScript
        ``.pt`` from ``pes-calc compile``.
    device
        ``"cuda"`` when available, else ``"cpu"``, unless given.
    dtype
        Float type to run in (``torch.float64`` or ``"float64"``, ...); the
        model's by default.
    skin
        Verlet skin in Å: neighbours are listed within cutoff + skin and the list is
        rebuilt only after an atom moves more than skin/2. 0 rebuilds every call.
    neighbor_backend
        ``"vesin"`` or ``"vesin-torch"``; by default vesin on CPU and vesin-torch on
        CUDA.
    ensemble_forces
        LLPR models: compute ``forces_ensemble`` and ``forces_uncertainty`` on every
        call (True), or only when asked for (False, the default: they cost
        min(members, features) extra backward passes). ``energy_uncertainty``,
        ``energies_uncertainty`` and ``energy_ensemble`` come with every call.

    Examples
    --------
    >>> import ase.build
    >>> from pes_calc import build_model
    >>> atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    >>> model = build_model("soap_bpnn", ["Cu"], soap={"max_angular": 2, "max_radial": 2})
    >>> atoms.calc = PESCalculator(model, device="cpu")
    >>> atoms.get_forces().shape, atoms.get_stress().shape
    ((4, 3), (6,))
    """

    implemented_properties = [
        "energy", "free_energy", "energies", "forces", "stress",
        *UNCERTAINTY_PROPERTIES,
    ]

    def __init__(
        self,
        model: torch.nn.Module | str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        skin: float = 0.5,
        neighbor_backend: Backend | None = None,
        ensemble_forces: bool = False,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        from pes_calc.compile import load_artefact
        from pes_calc.io import model_metadata

        dtype = as_dtype(dtype)
        self.device = as_device(device) or torch.device(
            "cuda" if torch.cuda.is_available() else "cpu"
        )
        if isinstance(model, (str, os.PathLike)):
            model, self.metadata = load_artefact(model, self.device)
        else:
            self.metadata = model_metadata(model)
        self.dtype = dtype or getattr(torch, self.metadata["dtype"])
        first = next(t for t in model.state_dict().values() if t.is_floating_point())
        if first.dtype != self.dtype or first.device != self.device:
            # Module.to converts in place: convert a copy, not the caller's model
            model = copy.deepcopy(model).to(device=self.device, dtype=self.dtype)
        self.model = model.eval()
        self.species: list[str] = list(self.metadata["species"])
        self.cutoff = float(self.metadata["cutoff"])
        if skin < 0:
            raise ValueError("skin must be ≥ 0 Å")
        self.skin = float(skin)
        self.neighbor_backend = neighbor_backend
        self.is_llpr = bool(self.metadata.get("llpr"))
        self.ensemble_forces = ensemble_forces
        self.neighbor_list_builds = 0
        self.neighbor_list_reuses = 0
        self._graph: AtomicGraph | None = None
        self._reference_positions: np.ndarray | None = None

    def calculate(
        self,
        atoms: ase.Atoms | None = None,
        properties: Sequence[str] = ("energy",),
        system_changes: Sequence[str] = all_changes,
    ) -> None:
        """Fill ``self.results`` with every property in one model call."""
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        assert atoms is not None  # set by the base class
        has_volume = bool(np.any(atoms.pbc) and atoms.cell.volume > 1e-12)
        if "stress" in properties and not has_volume:
            raise PropertyNotImplementedError(
                "stress needs a periodic cell with a volume; this structure has none"
            )
        if not self.is_llpr and any(p in UNCERTAINTY_PROPERTIES for p in properties):
            raise PropertyNotImplementedError(
                f"{', '.join(p for p in properties if p in UNCERTAINTY_PROPERTIES)} "
                "need an LLPR model (pes-calc train with architecture name llpr)"
            )
        if self.is_llpr:
            # an attribute, so eager and TorchScript models take the same switch
            self.model.ensemble_forces = self.ensemble_forces or any(
                p in FORCE_ENSEMBLE_PROPERTIES for p in properties
            )
        graph = self._current_graph(atoms, system_changes)
        # TorchScript's profiling optimiser costs seconds of warm-up per new input
        # shape and was no faster afterwards here (scoped: nothing global changes)
        with torch.jit.optimized_execution(False):
            outputs = self.model(graph, True, has_volume)
        self.results = self._to_results(outputs, has_volume)

    def calculate_batch(
        self,
        structures: Sequence[ase.Atoms],
        batch_size: int = 16,
        properties: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> list[dict[str, Any]] | list[ase.Atoms]:
        """Results for many structures, ``batch_size`` per model call, with this
        calculator's model, device, dtype and neighbour backend.

        Same results as one `calculate` per structure (stress only where the cell
        has a volume); ``self.results`` and the neighbour-list cache are left
        alone. Other keywords (``progress``, ``return_atoms``) and the result
        format: `pes_calc.evaluate`.
        """
        from pes_calc.batched import evaluate

        return evaluate(
            self, structures, batch_size=batch_size, properties=properties, **kwargs
        )

    def _current_graph(
        self, atoms: ase.Atoms, system_changes: Sequence[str]
    ) -> AtomicGraph:
        """The graph at the current positions, reusing the neighbour list if valid."""
        positions = np.asarray(atoms.positions)
        rebuild = (
            self._graph is None
            or self.skin == 0.0
            or any(c in system_changes for c in ("numbers", "cell", "pbc"))
            or self._reference_positions is None
            or len(positions) != len(self._reference_positions)
        )
        if not rebuild:
            assert self._reference_positions is not None
            # unwrapped displacement: an atom wrapped back into the cell counts as moved
            moved = np.linalg.norm(positions - self._reference_positions, axis=1)
            rebuild = bool(moved.max(initial=0.0) > 0.5 * self.skin)
        if rebuild:
            self._graph = atoms_to_graph(
                atoms,
                self.species,
                self.cutoff + self.skin,
                dtype=self.dtype,
                device=self.device,
                backend=self.neighbor_backend,
            )
            self._reference_positions = positions.copy()
            self.neighbor_list_builds += 1
        else:
            check_geometry(positions, atoms.cell.array, atoms.pbc)
            self.neighbor_list_reuses += 1
        assert self._graph is not None
        graph = self._graph._replace(
            positions=torch.as_tensor(positions, dtype=self.dtype).to(self.device)
        )
        return _within_cutoff(graph, self.cutoff) if self.skin > 0 else graph

    def _to_results(self, outputs: dict[str, torch.Tensor], has_volume: bool) -> dict:
        energy = float(outputs[keys.ENERGY].detach()[0].item())
        results: dict[str, Any] = {
            "energy": energy,
            "free_energy": energy,
            "energies": _numpy(outputs[keys.ENERGIES]),
        }
        if keys.FORCES in outputs:
            results["forces"] = _numpy(outputs[keys.FORCES])
        if has_volume and keys.STRESS in outputs:
            results["stress"] = full_3x3_to_voigt_6_stress(_numpy(outputs[keys.STRESS])[0])
        for name in UNCERTAINTY_PROPERTIES:
            if name in outputs:  # one structure: drop the structure axis
                value = _numpy(outputs[name])
                if name == keys.ENERGY_UNCERTAINTY:
                    results[name] = float(value[0])
                elif name == keys.ENERGY_ENSEMBLE:
                    results[name] = value[0]
                else:
                    results[name] = value
        return results


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float64).numpy()


def _within_cutoff(graph: AtomicGraph, cutoff: float) -> AtomicGraph:
    """Drop the skin's edges: keep those shorter than ``cutoff`` now."""
    keep = torch.linalg.vector_norm(edge_vectors(graph), dim=-1) < cutoff
    return graph._replace(
        edge_index=graph.edge_index[:, keep],
        edge_cell_shifts=graph.edge_cell_shifts[keep],
    )
