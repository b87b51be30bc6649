"""`PESModel`: pes_calc models in torch-sim, many systems per model call.

torch-sim (https://github.com/TorchSim/torch-sim) integrates, relaxes and samples
many systems at once: a ``SimState`` holds the atoms of all of them, and a
``ModelInterface`` returns their energies, forces and stresses from one call.
`PESModel` is that interface over any pes_calc model (``.safetensors``, TorchScript
``.pt``, AOTInductor ``.pt2`` or a model object, loaded as `PESCalculator` loads
it): the systems become one `AtomicGraph`, and one forward and one backward pass
give every output. Install with ``pip install -e ".[torchsim]"``.

What crosses the boundary (N atoms, S systems). The units agree, and so does the
stress: torch-sim's ``get_pressure`` reads (1/V) ∂E/∂ε, pes_calc's stress.

=====================  =============================================================
torch-sim              pes_calc
=====================  =============================================================
``cell`` (S, 3, 3)     transposed: torch-sim holds cell vectors as columns, we as rows
``pbc``                a bool (0.3) or (3,) per axis (0.4+), the same for all systems
``system_idx``         ``structure_index`` (``batch`` before torch-sim 0.3), sorted
``energy`` (S,)        eV
``forces`` (N, 3)      eV/Å
``stress`` (S, 3, 3)   eV/Å³, ASE's sign; zero where a system has no periodic volume
=====================  =============================================================

Also returned: ``energies`` (N,) eV per atom and, for LLPR models,
``energy_uncertainty`` (S,), ``energies_uncertainty`` (N,), ``energy_ensemble``
(S, M) in eV and, with ``ensemble_forces=True``, ``forces_uncertainty`` (N, 3) and
``forces_ensemble`` (M, N, 3) in eV/Å: `PESCalculator`'s names, standard deviations.

Neighbor lists (vesin on CPU, vesin-torch on CUDA, through `pes_calc.neighbors`)
are built within cutoff + ``skin`` and reused while every atom stays within skin/2
of where it was at the build and the cells, periodicity, atoms and species stay
the same. torch-sim wraps positions back into the cell each step; an atom that
crossed a face is followed by the whole cell vectors it jumped, and its edges'
cell shifts are corrected, so wrapping alone never forces a rebuild.

>>> import torch_sim as ts
>>> import ase.build
>>> from pes_calc import build_model
>>> model = build_model("soap_bpnn", ["Cu"], soap={"max_angular": 2, "max_radial": 2})
>>> systems = [ase.build.bulk("Cu", "fcc", a=3.6, cubic=True), ase.build.bulk("Cu")]
>>> state = ts.io.atoms_to_state(systems, torch.device("cpu"), torch.float32)
>>> outputs = PESModel(model, device="cpu")(state)
>>> outputs["energy"].shape, outputs["forces"].shape, outputs["stress"].shape
(torch.Size([2]), torch.Size([5, 3]), torch.Size([2, 3, 3]))
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from ase.data import atomic_numbers, chemical_symbols
from torch import Tensor

from pes_calc import keys
from pes_calc.calculator import PESCalculator
from pes_calc.graph import AtomicGraph, edge_vectors
from pes_calc.neighbors import (
    Backend,
    check_geometry,
    neighbor_list,
    neighbor_list_torch,
    species_indices,
)
from pes_calc.results import SMALLEST_VOLUME, UNCERTAINTY_PROPERTIES

try:
    from torch_sim.models.interface import ModelInterface
except ImportError as error:  # an optional extra: say how to get it
    raise ImportError(
        'pes_calc.torchsim needs torch-sim: pip install -e ".[torchsim]" (from a '
        "pes_calc checkout) or pip install torch-sim-atomistic"
    ) from error

__all__ = ["OUTPUTS", "PESModel"]

# the model outputs handed to torch-sim (those the model returns), detached
OUTPUTS = (
    keys.ENERGY,
    keys.ENERGIES,
    keys.FORCES,
    keys.STRESS,
    *UNCERTAINTY_PROPERTIES,
)


class _Inputs(NamedTuple):
    """What the model reads of a state, on its device, floats in its dtype."""

    positions: Tensor  # (N, 3) Å
    cell: Tensor  # (S, 3, 3) row-vector cells, Å
    pbc: Tensor  # (S, 3) bool
    numbers: Tensor  # (N,) atomic numbers
    system_idx: Tensor  # (N,) int64, sorted


@dataclass
class _NeighborCache:
    """A neighbor list within cutoff + skin and the inputs it was built for."""

    built_for: _Inputs
    species: Tensor  # (N,) int64 index into the model's species
    edge_index: Tensor  # (2, E) int64
    shifts: Tensor  # (E, 3) integer-valued cell shifts, in the model's dtype
    inverse: Tensor  # (S, 3, 3) pseudo-inverse of the periodic cell rows, 1/Å

    def serves(self, inputs: _Inputs) -> bool:
        """Whether the list may serve these cells, periodicity and atoms."""
        return all(
            torch.equal(getattr(inputs, name), getattr(self.built_for, name))
            for name in ("cell", "pbc", "numbers", "system_idx")
        )


class PESModel(ModelInterface):
    """torch-sim model interface over a pes_calc model.

    Parameters
    ----------
    model
        A pes_calc model object (Potential or LLPR), the path of a ``.safetensors``,
        ``.pt`` or ``.pt2`` model file, or a `PESCalculator` whose loaded model,
        device and dtype are used.
    device
        ``"cuda"`` when available, else ``"cpu"``, unless given.
    dtype
        Float type to run in (``torch.float64`` or ``"float64"``, ...); the model's
        by default. States of another dtype are cast in, and the outputs back.
    compute_stress, compute_forces
        Whether to return ``stress`` (S, 3, 3) and ``forces`` (N, 3); both come
        from the same backward pass.
    skin
        Verlet skin in Å (0 rebuilds every call), as for `PESCalculator`.
    neighbor_backend
        ``"vesin"`` or ``"vesin-torch"``; by default vesin on CPU, vesin-torch on
        CUDA.
    ensemble_forces
        LLPR models: also return ``forces_uncertainty`` and ``forces_ensemble``
        (min(members, features) extra backward passes per call).
    """

    def __init__(
        self,
        model: torch.nn.Module | str | os.PathLike | PESCalculator,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        compute_stress: bool = True,
        compute_forces: bool = True,
        *,
        skin: float = 0.5,
        neighbor_backend: Backend | None = None,
        ensemble_forces: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(model, PESCalculator):
            if device is not None or dtype is not None:
                raise ValueError(
                    "device and dtype come from the calculator; leave them out"
                )
            loaded = model
        else:
            # PESCalculator's loading: files, dtype/device casts, metadata
            loaded = PESCalculator(model, device=device, dtype=dtype)
        if skin < 0:
            raise ValueError("skin must be ≥ 0 Å")
        can_derive = bool(loaded.metadata.get("do_derivatives", True))
        if (compute_forces or compute_stress) and not can_derive:
            raise ValueError(
                "this is an energy-only model: pass compute_forces=False and "
                "compute_stress=False, or add derivatives with pes-calc compile "
                "--modifiers enable_ForceStressOutput"
            )
        self.calculator = loaded
        self.cutoff = loaded.cutoff
        self.species = loaded.species
        self.skin = float(skin)
        self.neighbor_backend: Backend = neighbor_backend or (
            "vesin-torch" if loaded.device.type == "cuda" else "vesin"
        )
        self.ensemble_forces = ensemble_forces
        self._device = loaded.device
        self._dtype = loaded.dtype
        self._compute_stress = compute_stress
        self._compute_forces = compute_forces
        self._memory_scales_with = "n_atoms_x_density"  # a radial cutoff
        self.neighbor_list_builds = 0
        self.neighbor_list_reuses = 0
        self._cache: _NeighborCache | None = None
        # atomic number → species index, -1 for elements the model does not know
        self._lookup = torch.full((len(chemical_symbols),), -1, dtype=torch.int64)
        for index, symbol in enumerate(self.species):
            self._lookup[atomic_numbers[symbol]] = index
        self._lookup = self._lookup.to(self._device)

    @property
    def compute_stress(self) -> bool:
        """Whether ``stress`` is returned."""
        return self._compute_stress

    @compute_stress.setter
    def compute_stress(self, value: bool) -> None:
        self._compute_stress = bool(value)

    @property
    def compute_forces(self) -> bool:
        """Whether ``forces`` is returned."""
        return self._compute_forces

    @compute_forces.setter
    def compute_forces(self, value: bool) -> None:
        self._compute_forces = bool(value)

    @property
    def is_llpr(self) -> bool:
        """Whether the model returns uncertainties."""
        return self.calculator.is_llpr

    def forward(self, state: Any, **_kwargs: Any) -> dict[str, Tensor]:
        """Energies (S,) eV, forces (N, 3) eV/Å and stress (S, 3, 3) eV/Å³ of all
        systems in ``state`` (a SimState or a dict of its fields), and LLPR
        uncertainties: detached, in the state's dtype."""
        out_dtype = _field(state, "positions").dtype
        inputs = self._read(state)
        n_systems = inputs.cell.shape[0]
        graph = self._graph(inputs)
        volume = torch.abs(torch.linalg.det(inputs.cell))
        with_volume = inputs.pbc.any(dim=1) & (volume > SMALLEST_VOLUME)
        compute_stress = self._compute_stress and bool(with_volume.any())
        model = self.calculator.model
        if self.is_llpr:
            # the LLPR's own switch, as PESCalculator sets it
            model.ensemble_forces = self.ensemble_forces and self._compute_forces
        # derivatives even under torch.no_grad(); no profiling optimiser (its
        # warm-up per input shape costs seconds, as PESCalculator notes)
        with torch.enable_grad(), torch.jit.optimized_execution(False):
            outputs = model(graph, self._compute_forces, compute_stress)
        results = {
            name: outputs[name].detach().to(out_dtype)
            for name in OUTPUTS
            if name in outputs
        }
        if not self._compute_forces:
            results.pop(keys.FORCES, None)
        if self._compute_stress:
            zeros = torch.zeros((n_systems, 3, 3), dtype=out_dtype, device=self._device)
            # no stress without a periodic volume (PESCalculator raises there)
            stress = results.get(keys.STRESS, zeros)
            results[keys.STRESS] = torch.where(
                with_volume[:, None, None], stress, zeros
            )
        else:
            results.pop(keys.STRESS, None)
        return results

    def _read(self, state: Any) -> _Inputs:
        """The state's fields on the model's device, floats in its dtype."""
        device, dtype = self._device, self._dtype
        positions = _field(state, "positions").detach().to(device, dtype)
        if not bool(torch.isfinite(positions).all()):
            raise ValueError("some positions are NaN or infinite")
        cell = _field(state, "cell").detach().to(device, dtype).reshape(-1, 3, 3)
        system_idx = _field(state, "system_idx", "batch")
        if system_idx is None:  # a single system
            system_idx = torch.zeros(len(positions), dtype=torch.int64)
        return _Inputs(
            positions=positions,
            cell=cell.transpose(1, 2).contiguous(),  # torch-sim's columns → rows
            pbc=_per_system_pbc(_field(state, "pbc"), cell.shape[0], device),
            numbers=_field(state, "atomic_numbers").to(device, torch.int64),
            system_idx=system_idx.to(device, torch.int64),
        )

    def _graph(self, inputs: _Inputs) -> AtomicGraph:
        """The graph at the current positions, reusing the neighbor list if valid."""
        cache, jumps = self._cache, None
        positions, cell, system_idx = inputs.positions, inputs.cell, inputs.system_idx
        if cache is not None and self.skin > 0 and cache.serves(inputs):
            displacement = positions - cache.built_for.positions  # (N, 3)
            # the whole cell vectors each atom was wrapped by (0 along open axes)
            jumps = torch.round(
                torch.einsum("nk,nkl->nl", displacement, cache.inverse[system_idx])
            )
            moved = displacement - torch.einsum("nk,nkl->nl", jumps, cell[system_idx])
            if float(torch.linalg.vector_norm(moved, dim=1).max()) > 0.5 * self.skin:
                jumps = None
        if cache is None or jumps is None:
            cache = self._cache = self._build(inputs)
            self.neighbor_list_builds += 1
            shifts = cache.shifts
        else:
            self.neighbor_list_reuses += 1
            # r_ij = R_j - R_i + S·cell stays the same vector when R_i moved by
            # n_i·cell: S' = S + n_i - n_j
            i, j = cache.edge_index[0], cache.edge_index[1]
            shifts = cache.shifts + jumps[i] - jumps[j]
        graph = AtomicGraph(
            positions=positions,
            cell=cell,
            pbc=inputs.pbc,
            species=cache.species,
            edge_index=cache.edge_index,
            edge_cell_shifts=shifts,
            structure_index=system_idx,
            properties={},
        )
        if self.skin == 0:
            return graph
        # drop the skin's edges, as PESCalculator does: the graph of a fresh build
        keep = torch.linalg.vector_norm(edge_vectors(graph), dim=-1) < self.cutoff
        return graph._replace(
            edge_index=graph.edge_index[:, keep], edge_cell_shifts=shifts[keep]
        )

    def _build(self, inputs: _Inputs) -> _NeighborCache:
        """Neighbor lists of every system within cutoff + skin, input checked."""
        cell, pbc, system_idx = inputs.cell, inputs.pbc, inputs.system_idx
        n_systems = cell.shape[0]
        if len(system_idx) and (
            bool((system_idx[1:] < system_idx[:-1]).any())
            or int(system_idx[-1]) >= n_systems
        ):
            raise ValueError(f"system_idx must be sorted and below {n_systems}")
        species = self._species(inputs.numbers)  # names unknown elements first
        counts = torch.bincount(system_idx, minlength=n_systems).tolist()
        starts, radius = np.cumsum([0, *counts]), self.cutoff + self.skin
        # vesin works in float64: exact edges for float32 models too
        positions = inputs.positions.detach().to("cpu", torch.float64)
        cell64 = cell.to("cpu", torch.float64)
        edges: list[Tensor] = []
        shifts: list[Tensor] = []
        for system in range(n_systems):
            start, stop = int(starts[system]), int(starts[system + 1])
            points, box, periodic = positions[start:stop], cell64[system], pbc[system]
            arrays = (points.numpy(), box.numpy(), periodic.cpu().numpy())
            try:
                check_geometry(*arrays)
            except ValueError as error:
                raise ValueError(f"system {system}: {error}") from error
            if self.neighbor_backend == "vesin-torch":
                on_device = (points.to(self._device), box.to(self._device), periodic)
                pair, shift = neighbor_list_torch(*on_device, radius)
            else:
                pair_np, shift_np = neighbor_list(*arrays, radius)
                pair, shift = torch.from_numpy(pair_np), torch.from_numpy(shift_np)
            edges.append(pair.to(self._device) + start)
            shifts.append(shift.to(self._device))
        # pinv of the periodic rows: fractional coordinates along periodic axes
        # only (open axes get 0, whether their cell rows are zero or not)
        periodic_rows = torch.where(pbc[:, :, None], cell, torch.zeros_like(cell))
        return _NeighborCache(
            built_for=_Inputs(*(tensor.clone() for tensor in inputs)),
            species=species,
            edge_index=torch.cat(edges, dim=1),
            shifts=torch.cat(shifts).to(self._dtype),
            inverse=torch.linalg.pinv(periodic_rows),
        )

    def _species(self, numbers: Tensor) -> Tensor:
        """Species indices of atomic numbers; `UnknownSpeciesError` names strangers."""
        if bool(((numbers < 0) | (numbers >= len(self._lookup))).any()):
            raise ValueError("atomic numbers must lie between 0 and 118")
        species = self._lookup[numbers]
        if bool((species < 0).any()):
            present = torch.unique(numbers).tolist()
            species_indices([chemical_symbols[z] for z in present], self.species)
        return species


def _field(state: Any, name: str, *older: str) -> Any:
    """A field of a torch-sim state or state dict, under its current name or
    an older one (``batch`` became ``system_idx`` in torch-sim 0.3)."""
    for candidate in (name, *older):
        if isinstance(state, Mapping):
            value = state.get(candidate)
        else:
            value = getattr(state, candidate, None)
        if value is not None:
            return value
    if name == "system_idx":
        return None
    raise ValueError(f"the state has no {name!r}")


def _per_system_pbc(value: Any, n_systems: int, device: torch.device) -> Tensor:
    """(S, 3) bool periodicity from torch-sim's bool (0.3) or (3,) tensor (0.4+)."""
    pbc = torch.as_tensor(value, dtype=torch.bool, device=device)
    if pbc.ndim == 0:
        pbc = pbc.expand(3)
    if pbc.ndim == 1:
        pbc = pbc.expand(n_systems, 3)
    if pbc.shape != (n_systems, 3):
        raise ValueError(
            f"pbc must be a bool, (3,) or ({n_systems}, 3), got {pbc.shape}"
        )
    return pbc.contiguous()
