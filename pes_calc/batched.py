"""Batched evaluation: many structures, one graph and one forward+backward per batch.

`evaluate_batches` joins ``batch_size`` structures into one `AtomicGraph`
(`pes_calc.graph.batch_graphs`, the batching the trainer uses), runs a loaded model
once with derivatives, and splits the outputs back into per-structure results
(`pes_calc.results`) that equal `PESCalculator`'s one by one. Users call it as
`pes_calc.evaluate` or `PESCalculator.calculate_batch`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import ase
import numpy as np
import torch
from ase.calculators.calculator import PropertyNotImplementedError
from ase.data import chemical_symbols
from tqdm.auto import tqdm

from pes_calc.graph import batch_graphs, batch_order
from pes_calc.neighbors import atoms_to_graph, check_geometry, species_indices
from pes_calc.results import (
    ALL_PROPERTIES,
    BASIC_PROPERTIES,
    CHEAP_UNCERTAINTIES,
    DERIVED_PROPERTIES,
    FORCE_ENSEMBLE_PROPERTIES,
    UNCERTAINTY_PROPERTIES,
    Result,
    as_atoms,
    has_volume,
    split_outputs,
)

# shown by default only when the work is long enough to be worth a bar
PROGRESS_MIN_STRUCTURES = 256


class LoadedModel(Protocol):
    """What batched evaluation needs of a loaded model: `PESCalculator` is one."""

    model: Any  # a Potential, an LLPR, a TorchScript module or a loaded package
    metadata: dict[str, Any]
    species: list[str]
    cutoff: float
    dtype: torch.dtype
    device: torch.device
    neighbor_backend: Any
    is_llpr: bool
    ensemble_forces: bool


def evaluate_batches(
    loaded: LoadedModel,
    structures: Sequence[ase.Atoms],
    *,
    batch_size: int = 16,
    properties: Sequence[str] | None = None,
    progress: bool | None = None,
    return_atoms: bool = False,
) -> list[Result] | list[ase.Atoms]:
    """Results of ``structures``, ``batch_size`` per model call, with ``loaded``'s
    model, device, dtype and neighbor backend (arguments: `pes_calc.evaluate`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    wanted = _wanted_properties(loaded, properties)
    structures = list(structures)
    if not structures:
        return []
    for index, atoms in enumerate(structures):  # fail before any model time is spent
        _check_structure(atoms, loaded.species, index)

    llpr_model = loaded.model
    previous_switch = getattr(llpr_model, "ensemble_forces", None)
    if loaded.is_llpr:
        # the LLPR's own switch, as in PESCalculator.calculate; restored below
        llpr_model.ensemble_forces = any(p in FORCE_ENSEMBLE_PROPERTIES for p in wanted)
    results: list[Result] = []
    try:
        with _progress_bar(len(structures), progress) as bar:
            for indices in batch_order(len(structures), batch_size, shuffle=False):
                chunk = [structures[i] for i in indices]
                results.extend(_evaluate_batch(loaded, chunk, indices, wanted))
                bar.update(len(chunk))
    finally:
        if loaded.is_llpr:
            llpr_model.ensemble_forces = previous_switch
    if return_atoms:
        pairs = zip(structures, results, strict=True)
        return [as_atoms(atoms, result) for atoms, result in pairs]
    return results


def _wanted_properties(
    loaded: LoadedModel, properties: Sequence[str] | None
) -> tuple[str, ...]:
    """The properties to return, checked against what the model can give."""
    can_derive = bool(loaded.metadata.get("do_derivatives", True))
    if properties is None:
        default = [
            p for p in BASIC_PROPERTIES if can_derive or p not in DERIVED_PROPERTIES
        ]
        if loaded.is_llpr:
            default += CHEAP_UNCERTAINTIES
            if loaded.ensemble_forces and can_derive:
                default += FORCE_ENSEMBLE_PROPERTIES
        return tuple(default)
    wanted = tuple(dict.fromkeys(properties))  # ordered, without repeats
    unknown = [p for p in wanted if p not in ALL_PROPERTIES]
    if unknown:
        raise ValueError(
            f"unknown properties {', '.join(unknown)}; known: "
            f"{', '.join(ALL_PROPERTIES)}"
        )
    uncertain = [p for p in wanted if p in UNCERTAINTY_PROPERTIES]
    if uncertain and not loaded.is_llpr:
        raise PropertyNotImplementedError(
            f"{', '.join(uncertain)} need an LLPR model (pes-calc train with "
            "architecture name llpr)"
        )
    derived = [p for p in wanted if p in DERIVED_PROPERTIES]
    if derived and not can_derive:
        raise PropertyNotImplementedError(
            f"{', '.join(derived)} need derivatives, and this is an energy-only model "
            "(pes-calc compile --modifiers enable_ForceStressOutput adds them)"
        )
    return wanted


@contextmanager
def _naming(index: int) -> Iterator[None]:
    """Re-raise a bad-input error of one structure with its index in front."""
    try:
        yield
    except ValueError as error:  # UnknownSpeciesError is one too: keep its type
        raise type(error)(f"structure {index}: {error}") from error


def _check_structure(atoms: ase.Atoms, species: Sequence[str], index: int) -> None:
    """The checks `atoms_to_graph` makes, on unique elements only (cheap)."""
    with _naming(index):
        present = [chemical_symbols[z] for z in np.unique(atoms.numbers)]
        species_indices(present, species)
        check_geometry(
            np.asarray(atoms.positions, dtype=np.float64),
            np.asarray(atoms.cell.array, dtype=np.float64),
            np.asarray(atoms.pbc, dtype=bool),
        )


def _evaluate_batch(
    loaded: LoadedModel,
    chunk: list[ase.Atoms],
    indices: list[int],
    wanted: tuple[str, ...],
) -> list[Result]:
    """One graph, one model call, results split back per structure."""
    graphs = []
    for index, atoms in zip(indices, chunk, strict=True):
        with _naming(index):
            graphs.append(
                atoms_to_graph(
                    atoms,
                    loaded.species,
                    loaded.cutoff,
                    dtype=loaded.dtype,
                    device=loaded.device,
                    backend=loaded.neighbor_backend,
                )
            )
    graph = batch_graphs(graphs)
    with_volume = [has_volume(atoms) for atoms in chunk]
    compute_forces = any(p in ("forces", *FORCE_ENSEMBLE_PROPERTIES) for p in wanted)
    compute_stress = "stress" in wanted and any(with_volume)
    # forces are derivatives even when the caller is under torch.no_grad(); the
    # profiling optimiser is off as in PESCalculator.calculate
    with torch.enable_grad(), torch.jit.optimized_execution(False):
        outputs = loaded.model(graph, compute_forces, compute_stress)
    return split_outputs(outputs, [len(atoms) for atoms in chunk], with_volume, wanted)


class _NoBar:
    def update(self, _count: int) -> None:
        pass


@contextmanager
def _progress_bar(total: int, show: bool | None) -> Iterator[Any]:
    """A tqdm bar over ``total`` structures, or one that draws nothing."""
    if show is None:
        show = total > PROGRESS_MIN_STRUCTURES and sys.stderr.isatty()
    if not show:
        yield _NoBar()
        return
    with tqdm(total=total, unit="structure", desc="evaluate") as bar:
        yield bar
