"""Batched evaluation: many structures, one graph and one forward+backward per batch.

`evaluate` is for screening, active-learning scoring and test sets: it joins
``batch_size`` structures into one `AtomicGraph` (`pes_calc.graph.batch_graphs`, the
batching the trainer uses), runs the model once with derivatives, and splits the
outputs back into per-structure results that equal `PESCalculator`'s one by one.

>>> import ase.build
>>> from pes_calc import build_model, evaluate
>>> model = build_model("soap_bpnn", ["Cu"], soap={"max_angular": 2, "max_radial": 2})
>>> cells = [ase.build.bulk("Cu", "fcc", a=a, cubic=True) for a in (3.5, 3.6, 3.7)]
>>> results = evaluate(model, cells, batch_size=2, device="cpu")
>>> len(results), results[0]["forces"].shape, results[0]["stress"].shape
(3, (4, 3), (6,))

The module is not called ``evaluate`` so that ``pes_calc.evaluate`` (the function)
never shadows a submodule of the same name.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import ase
import numpy as np
import torch
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import chemical_symbols
from ase.stress import full_3x3_to_voigt_6_stress

from pes_calc import keys
from pes_calc.calculator import (
    FORCE_ENSEMBLE_PROPERTIES,
    UNCERTAINTY_PROPERTIES,
    PESCalculator,
)
from pes_calc.graph import batch_graphs
from pes_calc.neighbors import atoms_to_graph, check_geometry, species_indices

Result = dict[str, Any]

BASIC_PROPERTIES = ("energy", "free_energy", "energies", "forces", "stress")
# what an energy-only model cannot give
DERIVED = ("forces", "stress", *FORCE_ENSEMBLE_PROPERTIES)
# what one calculator call fills for an LLPR model without ensemble forces
CHEAP_UNCERTAINTIES = (
    keys.ENERGY_UNCERTAINTY, keys.ENERGIES_UNCERTAINTY, keys.ENERGY_ENSEMBLE,
)
# per-atom outputs have the atoms on axis 0, except the ensemble's (M, N, 3)
PER_ATOM_AXIS = {
    keys.ENERGIES: 0, keys.FORCES: 0, keys.ENERGIES_UNCERTAINTY: 0,
    keys.FORCES_UNCERTAINTY: 0, keys.FORCES_ENSEMBLE: 1,
}
# shown by default only when the work is long enough to be worth a bar
PROGRESS_MIN_STRUCTURES = 256


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
    neighbor_backend: str | None = None,
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
    # the trainer's batching, imported here so `import pes_calc` stays light
    from pes_calc.train.data import batch_order

    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    calculator = _calculator(model, device, dtype, neighbor_backend)
    wanted = _wanted_properties(calculator, properties)
    structures = list(structures)
    if not structures:
        return []
    for index, atoms in enumerate(structures):  # fail before any model time is spent
        _check_structure(atoms, calculator.species, index)

    llpr_model = calculator.model
    previous_switch = getattr(llpr_model, "ensemble_forces", None)
    if calculator.is_llpr:
        # the LLPR's own switch, as in PESCalculator.calculate; restored below
        llpr_model.ensemble_forces = any(p in FORCE_ENSEMBLE_PROPERTIES for p in wanted)
    results: list[Result] = []
    try:
        with _progress_bar(len(structures), progress) as bar:
            for indices in batch_order(len(structures), batch_size, shuffle=False):
                chunk = [structures[i] for i in indices]
                results.extend(_evaluate_batch(calculator, chunk, indices, wanted))
                bar.update(len(chunk))
    finally:
        if calculator.is_llpr:
            llpr_model.ensemble_forces = previous_switch
    if return_atoms:
        pairs = zip(structures, results, strict=True)
        return [_as_atoms(atoms, result) for atoms, result in pairs]
    return results


def _calculator(
    model: torch.nn.Module | str | os.PathLike | PESCalculator,
    device: str | torch.device | None,
    dtype: torch.dtype | None,
    neighbor_backend: str | None,
) -> PESCalculator:
    """The calculator whose model, device, dtype and species are used: one loading
    path (files, metadata, casting a copy) for single and batched evaluation."""
    if isinstance(model, PESCalculator):
        if device is not None or dtype is not None or neighbor_backend is not None:
            raise ValueError(
                "device, dtype and neighbor_backend come from the calculator; "
                "leave them out when passing one"
            )
        return model
    return PESCalculator(
        model, device=device, dtype=dtype, neighbor_backend=neighbor_backend
    )


def _wanted_properties(
    calculator: PESCalculator, properties: Sequence[str] | None
) -> tuple[str, ...]:
    """The properties to return, checked against what the model can give."""
    can_derive = bool(calculator.metadata.get("do_derivatives", True))
    if properties is None:
        wanted = [p for p in BASIC_PROPERTIES if can_derive or p not in DERIVED]
        if calculator.is_llpr:
            wanted += CHEAP_UNCERTAINTIES
            if calculator.ensemble_forces and can_derive:
                wanted += FORCE_ENSEMBLE_PROPERTIES
        return tuple(wanted)
    wanted = tuple(dict.fromkeys(properties))  # ordered, without repeats
    unknown = [p for p in wanted if p not in PESCalculator.implemented_properties]
    if unknown:
        raise ValueError(
            f"unknown properties {', '.join(unknown)}; known: "
            f"{', '.join(PESCalculator.implemented_properties)}"
        )
    uncertain = [p for p in wanted if p in UNCERTAINTY_PROPERTIES]
    if uncertain and not calculator.is_llpr:
        raise PropertyNotImplementedError(
            f"{', '.join(uncertain)} need an LLPR model (pes-calc train with "
            "architecture name llpr)"
        )
    derived = [p for p in wanted if p in DERIVED]
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


def _has_volume(atoms: ase.Atoms) -> bool:
    """PESCalculator's rule for when stress is defined."""
    return bool(np.any(atoms.pbc) and atoms.cell.volume > 1e-12)


def _evaluate_batch(
    calculator: PESCalculator,
    chunk: list[ase.Atoms],
    indices: list[int],
    wanted: tuple[str, ...],
) -> list[Result]:
    """One graph, one model call, results split back per structure."""
    graphs = []
    for index, atoms in zip(indices, chunk, strict=True):
        with _naming(index):
            graphs.append(atoms_to_graph(
                atoms, calculator.species, calculator.cutoff, dtype=calculator.dtype,
                device=calculator.device, backend=calculator.neighbor_backend,
            ))
    graph = batch_graphs(graphs)
    with_volume = [_has_volume(atoms) for atoms in chunk]
    compute_forces = any(p in ("forces", *FORCE_ENSEMBLE_PROPERTIES) for p in wanted)
    compute_stress = "stress" in wanted and any(with_volume)
    # forces are derivatives even when the caller is under torch.no_grad(); the
    # profiling optimiser is off as in PESCalculator.calculate
    with torch.enable_grad(), torch.jit.optimized_execution(False):
        outputs = calculator.model(graph, compute_forces, compute_stress)

    names = [n for n in wanted if n in outputs or n == "free_energy"]
    arrays = {
        name: outputs[name].detach().to("cpu", torch.float64).numpy()
        for name in names if name in outputs
    }
    if keys.STRESS in arrays:
        arrays[keys.STRESS] = full_3x3_to_voigt_6_stress(arrays[keys.STRESS])
    bounds = np.cumsum([0] + [len(atoms) for atoms in chunk])
    results: list[Result] = []
    for position in range(len(chunk)):
        start, stop = bounds[position], bounds[position + 1]
        result: Result = {}
        for name, value in arrays.items():
            if name in PER_ATOM_AXIS:
                atom_slice = [slice(None)] * value.ndim
                atom_slice[PER_ATOM_AXIS[name]] = slice(start, stop)
                result[name] = value[tuple(atom_slice)].copy()
            elif name == keys.STRESS:
                if with_volume[position]:
                    result[name] = value[position].copy()
            elif name in (keys.ENERGY, keys.ENERGY_UNCERTAINTY):
                result[name] = float(value[position])
            else:
                result[name] = value[position].copy()
        if "free_energy" in names:
            result["free_energy"] = float(arrays[keys.ENERGY][position])
        results.append(result)
    return results


def _as_atoms(atoms: ase.Atoms, result: Result) -> ase.Atoms:
    """A copy of ``atoms`` holding ``result`` where ASE and extxyz look for it."""
    copy = atoms.copy()
    standard = {k: v for k, v in result.items() if k in BASIC_PROPERTIES}
    copy.calc = SinglePointCalculator(copy, **standard)
    for name, value in result.items():
        if name in standard:
            continue
        if name in (keys.ENERGY_UNCERTAINTY, keys.ENERGY_ENSEMBLE):
            copy.info[name] = value
        elif name == keys.FORCES_ENSEMBLE:  # extxyz holds 1-D/2-D per-atom arrays
            copy.arrays[name] = np.ascontiguousarray(
                value.transpose(1, 0, 2).reshape(len(copy), -1)
            )
        else:
            copy.arrays[name] = value
    return copy


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
    from tqdm.auto import tqdm

    with tqdm(total=total, unit="structure", desc="evaluate") as bar:
        yield bar
