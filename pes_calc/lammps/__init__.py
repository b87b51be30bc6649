"""Production MD in LAMMPS: a pes_calc model fills a ``fix external`` on every rank.

The input keeps its own units (metal), fixes, computes, dumps and restarts, and
declares where the model's forces go::

    fix mlip all external pf/callback 1 1

``pes-calc lammps in.lammps --model m.pt2 --types Cu`` (under ``mpiexec -n N`` for
N ranks) runs it; from Python, `attach` couples a model to a ``lammps.lammps``
instance once that fix exists. pes_calc sets the ghost-atom cutoff the model needs
(``comm_modify cutoff``) and turns on the fix's energy and virial
(``fix_modify energy yes virial yes``), so thermo ``pe``/``press``, ``fix npt`` and
``compute pe/atom`` see the model. LLPR models also write each atom's energy
uncertainty (eV) to the per-atom property ``d_energy_uncertainty``, which a dump can
list. How the ranks share the work: `pes_calc.lammps.coupling`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pes_calc.calculator import PESCalculator
from pes_calc.lammps._library import LammpsUnavailableError, import_lammps, import_mpi
from pes_calc.lammps.coupling import (
    ERROR_VARIABLE,
    UNCERTAIN_VARIABLE,
    UNCERTAINTY_PROPERTY,
    LammpsCoupling,
    receptive_layers,
)
from pes_calc.lammps.exchange import SingleRank

__all__ = [
    "LammpsCoupling",
    "LammpsUnavailableError",
    "attach",
    "ghost_cutoff",
    "import_lammps",
]

DEFAULT_NEIGHBOR_SKIN = 2.0  # LAMMPS's default for units metal, Å


def ghost_cutoff(calculator: PESCalculator, neighbor_skin: float) -> float:
    """Ghost-atom cutoff (Å) for exact forces: the model's receptive field plus
    the distance LAMMPS lets atoms move between re-neighborings."""
    return calculator.cutoff * receptive_layers(calculator.metadata) + neighbor_skin


def attach(
    lmp: Any,
    model: torch.nn.Module | str | os.PathLike,
    types: list[str],
    fix: str = "mlip",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    skin: float = 0.5,
    neighbor_skin: float = DEFAULT_NEIGHBOR_SKIN,
    max_uncertainty: float | None = None,
    record_to: str | os.PathLike | None = None,
    comm: Any = None,
) -> LammpsCoupling:
    """Let ``model`` compute the forces of ``fix external`` ``fix`` in ``lmp``.

    Call it on every rank, after the input has defined the box, the atoms and
    ``fix FIX all external pf/callback 1 1``, and before ``run``.

    Parameters
    ----------
    lmp
        A ``lammps.lammps`` instance (`import_lammps` loads the module).
    model
        A model object or file (``.safetensors``, ``.pt``, ``.pt2``).
    types
        The element of each LAMMPS atom type, in type order (``pair_coeff * * Cu
        Ag`` spells the same).
    fix
        ID of the ``fix external pf/callback`` in the input.
    device, dtype, skin
        As for `PESCalculator` (device: CPU unless given; ``"cuda"`` on several
        ranks gives each rank on a node its own GPU, local rank modulo the GPU
        count; ``"cuda:N"`` is taken as given). ``skin`` (Å) is pes_calc's own
        Verlet skin between LAMMPS's re-neighborings.
    neighbor_skin
        LAMMPS's neighbor skin (the ``neighbor`` command; 2 Å by default in units
        metal): how far atoms move before LAMMPS rebuilds its ghost atoms. The
        ghost cutoff is the model's receptive field plus this; a run where atoms
        move farther stops with an error, never a wrong force.
    max_uncertainty
        LLPR models: stop the run cleanly when an atom's energy uncertainty
        exceeds this (eV), appending the structure to ``record_to``.
    comm
        The mpi4py communicator LAMMPS runs on (COMM_WORLD by default).
    """
    if lmp.extract_global("units") != "metal":
        raise ValueError(
            f"the input uses units {lmp.extract_global('units')}; pes_calc models "
            "work in units metal (eV, Å, ps)"
        )
    if comm is None:
        comm = (
            import_mpi().COMM_WORLD
            if lmp.extract_setting("world_size") > 1
            else SingleRank()
        )
    if str(device) == "cuda" and comm.size > 1:  # one GPU per rank on each node
        local_rank = comm.Split_type(import_mpi().COMM_TYPE_SHARED).Get_rank()
        device = f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}"
    calculator = PESCalculator(model, device=device or "cpu", dtype=dtype, skin=skin)
    num_types = lmp.extract_setting("ntypes")
    if len(types) != num_types:
        raise ValueError(
            f"the box has {num_types} atom type(s) but {len(types)} element(s) were "
            f"given ({' '.join(types)}); give one element per LAMMPS type"
        )
    unknown = [t for t in types if t not in calculator.species]
    if unknown:
        raise ValueError(
            f"{', '.join(unknown)} is not an element of this model; its species are "
            f"{', '.join(calculator.species)}"
        )
    if max_uncertainty is not None and not calculator.is_llpr:
        raise ValueError("--max-uncertainty needs an LLPR model (energy uncertainties)")
    cutoff = ghost_cutoff(calculator, neighbor_skin)
    lmp.command(f"comm_modify cutoff {cutoff:.6f}")
    lmp.command(f"fix_modify {fix} energy yes virial yes")
    lmp.command(f"variable {ERROR_VARIABLE} internal 0")
    lmp.command(
        f"fix {ERROR_VARIABLE} all halt 1 v_{ERROR_VARIABLE} > 0 error hard message no"
    )
    if calculator.is_llpr:
        lmp.command(
            f"fix {UNCERTAINTY_PROPERTY} all property/atom d_{UNCERTAINTY_PROPERTY}"
        )
        if max_uncertainty is not None:
            lmp.command(f"variable {UNCERTAIN_VARIABLE} internal 0")
            lmp.command(
                f"fix {UNCERTAIN_VARIABLE} all halt 1 v_{UNCERTAIN_VARIABLE} > 0 "
                "error soft message no"
            )
    coupling = LammpsCoupling(
        lmp,
        calculator,
        list(types),
        fix,
        comm,
        neighbor_skin,
        max_uncertainty=max_uncertainty,
        record_to=None if record_to is None else Path(record_to),
    )
    lmp.set_fix_external_callback(fix, coupling, None)
    return coupling
