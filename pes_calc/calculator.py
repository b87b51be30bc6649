"""`PESCalculator`: the ASE face of every pes_calc model.

One forward and one backward pass per new geometry fill energy, per-atom energies,
forces and stress together; ASE's own cache serves the other properties. The
neighbor list is built with a Verlet skin and reused until an atom has moved more
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

from pes_calc.artefacts import load_artefact
from pes_calc.batched import evaluate_batches
from pes_calc.choices import as_device, as_dtype
from pes_calc.graph import AtomicGraph, edge_vectors
from pes_calc.io import model_metadata
from pes_calc.llpr import LLPR
from pes_calc.neighbors import Backend, atoms_to_graph, check_geometry
from pes_calc.potential import Potential
from pes_calc.results import (
    ALL_PROPERTIES,
    FORCE_ENSEMBLE_PROPERTIES,
    UNCERTAINTY_PROPERTIES,
    Result,
    has_volume,
    split_outputs,
)


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
        Verlet skin in Å: neighbors are listed within cutoff + skin and the list is
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
    >>> model = build_model(
    ...     "soap_bpnn", ["Cu"], soap={"max_angular": 2, "max_radial": 2}
    ... )
    >>> atoms.calc = PESCalculator(model, device="cpu")
    >>> atoms.get_forces().shape, atoms.get_stress().shape
    ((4, 3), (6,))
    """

    implemented_properties = list(ALL_PROPERTIES)

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
        dtype = as_dtype(dtype)
        self.device = as_device(device) or torch.device(
            "cuda" if torch.cuda.is_available() else "cpu"
        )
        if isinstance(model, (str, os.PathLike)):
            model, self.metadata = load_artefact(model, self.device)
        elif isinstance(model, (Potential, LLPR)):
            self.metadata = model_metadata(model)
        else:
            raise TypeError(
                "PESCalculator takes a model file's path or a pes_calc model "
                f"(Potential or LLPR), not {type(model).__name__}"
            )
        self.dtype = dtype or getattr(torch, self.metadata["dtype"])
        first = next(t for t in model.state_dict().values() if t.is_floating_point())
        if first.dtype != self.dtype or first.device != self.device:
            # Module.to converts in place: convert a copy, not the caller's model
            model = copy.deepcopy(model).to(device=self.device, dtype=self.dtype)
        # a Potential, an LLPR, a TorchScript module or a loaded AOTInductor package
        self.model: Any = model.eval()
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
        with_volume = has_volume(atoms)
        if "stress" in properties and not with_volume:
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
            outputs = self.model(graph, True, with_volume)
        self.results = split_outputs(outputs, [len(atoms)], [with_volume])[0]

    def calculate_batch(
        self,
        structures: Sequence[ase.Atoms],
        batch_size: int = 16,
        properties: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> list[Result] | list[ase.Atoms]:
        """Results for many structures, ``batch_size`` per model call, with this
        calculator's model, device, dtype and neighbor backend.

        Same results as one `calculate` per structure (stress only where the cell
        has a volume); ``self.results`` and the neighbor-list cache are left
        alone. Other keywords (``progress``, ``return_atoms``) and the result
        format: `pes_calc.evaluate`.
        """
        return evaluate_batches(
            self, structures, batch_size=batch_size, properties=properties, **kwargs
        )

    def _current_graph(
        self, atoms: ase.Atoms, system_changes: Sequence[str]
    ) -> AtomicGraph:
        """The graph at the current positions, reusing the neighbor list if valid."""
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


def evaluate(
    model: torch.nn.Module | str | os.PathLike | PESCalculator,
    structures: Sequence[ase.Atoms],
    *,
    batch_size: int = 16,
    properties: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool | None = None,
    return_atoms: bool = False,
    neighbor_backend: Backend | None = None,
) -> list[Result] | list[ase.Atoms]:
    """Energies, forces, stress (and LLPR uncertainties) of many structures.

    Parameters
    ----------
    model
        A model object, the path of a ``.safetensors`` model or TorchScript ``.pt``
        (loaded as `PESCalculator` loads it), or a `PESCalculator` whose loaded
        model, device and dtype are used.
    structures
        Any mix of periodic, partly periodic (slabs) and non-periodic structures.
    batch_size
        Structures per graph; one forward and one backward pass each. On CPU,
        8–32 structures of ~40 atoms were fastest (scripts/benchmark_evaluate.py);
        much larger graphs were slower per atom.
    properties
        Names from `PESCalculator.implemented_properties`. Default: what one
        calculator call fills — ``energy``, ``free_energy``, ``energies``,
        ``forces``, ``stress`` and, for LLPR models, ``energy_uncertainty``,
        ``energies_uncertainty`` and ``energy_ensemble``. ``forces_uncertainty``
        and ``forces_ensemble`` cost min(members, features) extra backward passes
        per batch and are computed only when named (or when a calculator with
        ``ensemble_forces=True`` is given).
    device, dtype
        As for `PESCalculator`: CUDA when available and the model's dtype, unless
        given; must be left out when ``model`` is a calculator.
    progress
        Show a tqdm bar counting structures; by default, on a terminal for more
        than `PROGRESS_MIN_STRUCTURES` structures.
    return_atoms
        Return copies of ``structures`` instead of dicts: energy, free_energy,
        energies, forces and stress in a ``SinglePointCalculator`` (so that
        ``ase.io.write(..., format="extxyz")`` writes them), uncertainties in
        ``info`` (``energy_uncertainty``, ``energy_ensemble``) and ``arrays``
        (``energies_uncertainty``, ``forces_uncertainty``, and ``forces_ensemble``
        as (N, 3M): member k's forces in columns 3k to 3k+2).
    neighbor_backend
        ``"vesin"`` or ``"vesin-torch"``; by default chosen by the device.

    Returns
    -------
    One result per structure, in order: a dict with ``energy`` (float, eV),
    ``free_energy`` (the same), ``energies`` (N,) eV, ``forces`` (N, 3) eV/Å,
    ``stress`` (6,) eV/Å³ in ASE's Voigt order — only for a periodic structure
    with a cell volume, the others have no ``stress`` key — and, for LLPR models,
    ``energy_uncertainty`` (float, eV), ``energies_uncertainty`` (N,) eV,
    ``energy_ensemble`` (M,) eV, ``forces_uncertainty`` (N, 3) eV/Å and
    ``forces_ensemble`` (M, N, 3) eV/Å. Values are float64 numpy arrays.

    Raises
    ------
    UnknownSpeciesError, ValueError
        Before any evaluation, naming the structure index: an element the model
        does not know, NaN/infinite positions or cell, a periodic direction with
        a zero cell vector.
    PropertyNotImplementedError
        Uncertainties from a model without LLPR, or forces/stress from an
        energy-only model.
    """
    if isinstance(model, PESCalculator):
        if device is not None or dtype is not None or neighbor_backend is not None:
            raise ValueError(
                "device, dtype and neighbor_backend come from the calculator; "
                "leave them out when passing one"
            )
        calculator = model
    else:
        calculator = PESCalculator(
            model, device=device, dtype=dtype, neighbor_backend=neighbor_backend
        )
    return calculator.calculate_batch(
        structures,
        batch_size=batch_size,
        properties=properties,
        progress=progress,
        return_atoms=return_atoms,
    )


def _within_cutoff(graph: AtomicGraph, cutoff: float) -> AtomicGraph:
    """Drop the skin's edges: keep those shorter than ``cutoff`` now."""
    keep = torch.linalg.vector_norm(edge_vectors(graph), dim=-1) < cutoff
    return graph._replace(
        edge_index=graph.edge_index[:, keep],
        edge_cell_shifts=graph.edge_cell_shifts[keep],
    )
