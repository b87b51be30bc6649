"""`LammpsCoupling`: the ``fix external`` callback that runs a pes_calc model on
every MPI rank, each step.

Per step and rank: LAMMPS's local + ghost positions → the rank's graph (see
`pes_calc.lammps.domain`) → the model → forces on local atoms, plus the forces on
ghost atoms sent to their owners (`pes_calc.lammps.exchange`); the energy, the
virial and per-atom energies (and LLPR per-atom energy uncertainties) go back to
LAMMPS. The rank's energy is the sum of its local atoms' energies, so the ranks'
forces, energies and virials add up to those of the whole box.

Exact for any rank count: the ghost shell LAMMPS communicates is the model's
receptive field (``cutoff`` × message-passing layers) plus LAMMPS's neighbor skin,
and the graph keeps the edges whose centres can reach a local atom's energy.
Strictly local models (one layer: SOAP-BPNN, Allegro) give every artefact's own
forces; message passing across ranks (NequIP) differentiates the local atoms'
energies alone, with the eager or TorchScript model.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any

import ase
import ase.io
import numpy as np

from pes_calc.calculator import PESCalculator
from pes_calc.lammps.domain import (
    GhostSelection,
    fractional,
    read_box,
    select_ghosts,
)
from pes_calc.lammps.exchange import ReverseExchange
from pes_calc.lammps.rank_graph import (
    RankGraph,
    build_rank_graph,
    graph_now,
    local_energy_derivatives,
    model_derivatives,
    per_atom_virial,
)

ERROR_VARIABLE = "pes_calc_error"
UNCERTAIN_VARIABLE = "pes_calc_uncertain"
UNCERTAINTY_PROPERTY = "energy_uncertainty"


def receptive_layers(metadata: dict[str, Any]) -> int:
    """How many cutoffs away an atom's energy can feel another atom."""
    if metadata.get("architecture") == "nequip":
        return int(metadata["model"]["num_layers"])
    long_range = (metadata.get("model") or {}).get("long_range") or {}
    if long_range.get("enable"):
        raise NotImplementedError(
            "long-range (Ewald/PME) SOAP-BPNN models need the whole box on every "
            "rank; LAMMPS domain decomposition cannot run them exactly"
        )
    return 1


class LammpsCoupling:
    """A pes_calc model as the forces of one LAMMPS ``fix external``.

    Made by `pes_calc.lammps.attach`; LAMMPS calls it with
    ``(caller, step, nlocal, tags, x, fext)`` on every rank.

    Attributes
    ----------
    steps
        Force calls so far on this rank.
    seconds
        Wall time spent in them (model, graph, communication).
    neighbor_list_builds
        Neighbor lists built on this rank (LAMMPS re-neighborings or moves past
        half the skin).
    error
        The message that stopped the run, or None.
    stopped_uncertain
        ``(step, max per-atom energy uncertainty in eV)`` if ``max_uncertainty``
        stopped the run.
    """

    def __init__(
        self,
        lmp: Any,
        calculator: PESCalculator,
        types: list[str],
        fix: str,
        comm: Any,
        neighbor_skin: float,
        max_uncertainty: float | None = None,
        record_to: str | Path | None = None,
    ):
        self.lmp = lmp
        self.calculator = calculator
        self.fix = fix
        self.comm = comm
        self.layers = receptive_layers(calculator.metadata)
        self.cutoff = calculator.cutoff
        self.skin = calculator.skin
        self.neighbor_skin = float(neighbor_skin)
        self.max_uncertainty = max_uncertainty
        self.record_to = None if record_to is None else Path(record_to)
        # LAMMPS type t (from 1) → the model's species index
        self.type_to_species = np.array(
            [-1] + [calculator.species.index(symbol) for symbol in types],
            dtype=np.int64,
        )
        self.types = list(types)
        self.exchange = ReverseExchange(comm)
        self.steps = 0
        self.seconds = 0.0
        self.neighbor_list_builds = 0
        self.error: str | None = None
        self.stopped_uncertain: tuple[int, float] | None = None
        self._selection: GhostSelection | None = None
        self._counts: tuple[int, int] = (-1, -1)
        self._graph: RankGraph | None = None
        self._reneighbored_at: np.ndarray | None = None
        self._warned_eager = False

    # -- the callback ------------------------------------------------------------

    def __call__(
        self, caller: Any, step: int, nlocal: int, tags: Any, x: Any, fext: np.ndarray
    ) -> None:
        start = time.perf_counter()
        lmp = self.lmp
        nall = nlocal + lmp.extract_setting("nghost")
        positions = lmp.numpy.extract_atom("x", nelem=nall, dim=3)
        self._box = read_box(lmp)  # every step: fix npt and deform change it
        changed = (
            lmp.extract_setting("neigh_ago") == 0 or (nlocal, nall) != self._counts
        )
        if self._any_rank(changed):
            self._replan(positions, self._tags(nall), nlocal)
            self._counts = (nlocal, nall)

        problem: str | None = None
        if self.exchange.unowned:
            problem = f"{self.exchange.unowned} ghost atoms have no owner on any rank"
        # forces, plus the per-atom virial on steps where LAMMPS asks for it
        # (LAMMPS keeps the last step that tallies per-atom virials, not a flag)
        width = 9 if lmp.extract_global("vflag_atom") == step else 3
        local = np.zeros((nlocal, width))
        energies = np.zeros(nlocal)
        uncertainties = np.zeros(nlocal)
        virial = np.zeros(6)
        remote = np.zeros((self._num_remote, width))
        displacement = 0.0
        if not problem:
            try:
                displacement = self._displacement(positions, nlocal)
                local, energies, uncertainties, virial, remote = self._evaluate(
                    positions, nlocal, width == 9
                )
            except Exception as error:  # every rank must still reach the collectives
                problem = f"{type(error).__name__}: {error}"
        self.exchange.send(remote, local)

        reports = np.array(
            self.comm.allgather(
                [
                    float(energies.sum()),
                    float(bool(problem)),
                    float(uncertainties.max(initial=0.0)),
                    displacement,
                    *virial,
                ]
            )
        )
        if reports[:, 3].max() > 0.5 * self.neighbor_skin and not reports[:, 1].any():
            problem = (
                f"an atom moved {reports[:, 3].max():.3g} Å since LAMMPS last rebuilt "
                f"its ghost atoms, more than half the neighbor skin pes_calc was "
                f"given ({self.neighbor_skin} Å): ghost atoms may be missing. Give "
                "pes-calc lammps --neighbor-skin the skin of the input's `neighbor` "
                "command, or let LAMMPS check distances (neigh_modify check yes)"
            )
            reports[self.comm.rank, 1] = 1.0
        if reports[:, 1].any():
            self._stop_with_error(step, problem, fext)
        else:
            fext[:nlocal] = local[:, :3]
            if width == 9:
                lmp.numpy.fix_external_set_virial_peratom(
                    self.fix, np.ascontiguousarray(local[:, 3:])
                )
            # LAMMPS adds a fix's energy and virial after its sum over ranks: totals
            lmp.fix_external_set_energy_global(self.fix, float(reports[:, 0].sum()))
            lmp.fix_external_set_virial_global(
                self.fix, reports[:, 4:].sum(axis=0).tolist()
            )
            lmp.numpy.fix_external_set_energy_peratom(self.fix, energies)
            if self.calculator.is_llpr:
                lmp.numpy.extract_atom(f"d_{UNCERTAINTY_PROPERTY}", nelem=nlocal)[:] = (
                    uncertainties
                )
                largest = float(reports[:, 2].max())
                over = (
                    self.max_uncertainty is not None
                    and not largest <= self.max_uncertainty
                )
                if over and self.stopped_uncertain is None:  # record the first only
                    self._stop_uncertain(
                        step, largest, positions[:nlocal], self._tags(nlocal)
                    )
        self.steps += 1
        self.seconds += time.perf_counter() - start

    def _tags(self, count: int) -> np.ndarray:
        """LAMMPS's atom IDs of the first ``count`` atoms (locals, then ghosts)."""
        return self.lmp.numpy.extract_atom("id", nelem=count).astype(np.int64)

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any. Collective."""
        return any(self.comm.allgather(bool(flag)))

    # -- ghosts and graph ----------------------------------------------------------

    def _replan(self, positions: np.ndarray, tags: np.ndarray, nlocal: int) -> None:
        """New ghosts after a LAMMPS re-neighboring: select them, plan the exchange."""
        units = self.lmp.extract_global("units")
        if units != "metal":
            self.error = f"units {units}: pes_calc models work in units metal (eV, Å)"
        box = self._box
        selection = select_ghosts(tags, positions, nlocal, box)
        remote = selection.kept[selection.owner_local < 0]
        unique_tags, first, slot = np.unique(
            tags[remote], return_index=True, return_inverse=True
        )
        self.exchange.plan(
            unique_tags, fractional(positions[remote[first]], box), box, tags[:nlocal]
        )
        # per kept ghost: its row among the remote tags, or -1 for this rank's own atoms
        remote_slot = np.full(len(selection.kept), -1, dtype=np.int64)
        remote_slot[selection.owner_local < 0] = slot.reshape(-1)
        self._selection = selection
        self._remote_slot = remote_slot
        self._num_remote = len(unique_tags)
        tracked = np.concatenate([np.arange(nlocal), selection.kept])
        self._tracked = tracked
        self._reneighbored_at = positions[tracked].copy()
        self._graph = None

    def _displacement(self, positions: np.ndarray, nlocal: int) -> float:
        """Largest move of a local or kept ghost atom since LAMMPS's re-neighboring."""
        assert self._reneighbored_at is not None
        moved = positions[self._tracked] - self._reneighbored_at
        return float(np.sqrt((moved**2).sum(axis=1).max(initial=0.0)))

    def _evaluate(self, positions: np.ndarray, nlocal: int, with_atom_virial: bool):  # noqa: ANN202
        """Forces (and with ``with_atom_virial`` per-atom virials, 6 more columns)
        on local atoms and on remote ghosts, per-atom energies and uncertainties,
        and the rank's virial (LAMMPS order xx yy zz xy xz yz, eV)."""
        if self.error:
            raise ValueError(self.error)
        assert self._selection is not None
        calculator = self.calculator
        if self._graph is None or self._graph.moved_past(positions, 0.5 * self.skin):
            types = self.lmp.numpy.extract_atom("type", nelem=len(positions))
            self._graph = build_rank_graph(
                positions,
                self.type_to_species[types],
                nlocal,
                self._selection.kept,
                self._selection.owner_local,
                self._remote_slot,
                self._box,
                self.cutoff + self.skin,
                self.layers,
                calculator.device,
                calculator.dtype,
            )
            self.neighbor_list_builds += 1
        rank_graph = self._graph
        graph = graph_now(
            rank_graph, positions, self._box, self.cutoff, calculator.dtype
        )
        if rank_graph.ghost_centres:
            derivatives = local_energy_derivatives(self._eager_model(), graph, nlocal)
        else:
            derivatives = model_derivatives(
                calculator.model, graph, nlocal, self._box.volume
            )
        gradient = derivatives.strain_gradient
        virial = -gradient[[0, 1, 2, 0, 0, 1], [0, 1, 2, 1, 2, 2]]
        node_values = derivatives.node_forces
        if with_atom_virial:
            atom_virial = per_atom_virial(self._eager_model(), graph, nlocal)
            node_values = np.concatenate([node_values, atom_virial], axis=1)
        local = node_values[:nlocal].copy()
        ghosts = node_values[nlocal:]
        own = rank_graph.own_local >= 0
        np.add.at(local, rank_graph.own_local[own], ghosts[own])
        remote = np.zeros((self._num_remote, node_values.shape[1]))
        np.add.at(remote, rank_graph.remote_slot[~own], ghosts[~own])
        return local, derivatives.energies, derivatives.uncertainties, virial, remote

    def _eager_model(self) -> Any:
        """A model whose per-atom energies autograd can differentiate: an
        AOTInductor package's compiled graph cannot, its eager model can."""
        model = self.calculator.model
        if hasattr(model, "eager") and hasattr(model, "compiled"):
            if not self._warned_eager and self.comm.rank == 0:
                warnings.warn(
                    "message passing across ranks and per-atom virials run the "
                    "eager model inside the .pt2 package (its compiled graph "
                    "differentiates only the total energy)",
                    stacklevel=2,
                )
            self._warned_eager = True
            model = model.eager
        return model

    # -- stopping ----------------------------------------------------------------

    def _stop_with_error(
        self, step: int, problem: str | None, fext: np.ndarray
    ) -> None:
        """Zero this step's forces and stop the run (fix halt) on every rank."""
        problems = [(r, m) for r, m in enumerate(self.comm.allgather(problem)) if m]
        rank, message = problems[0] if problems else (0, "unknown error")
        self.error = f"step {step}, rank {rank}: {message}"
        fext[:] = 0.0
        self.lmp.set_internal_variable(ERROR_VARIABLE, 1.0)
        if self.comm.rank == 0:
            print(
                f"pes_calc: stopping LAMMPS at {self.error}",
                file=sys.stderr,
                flush=True,
            )

    def _stop_uncertain(
        self, step: int, largest: float, positions: np.ndarray, tags: np.ndarray
    ) -> None:
        """Write the structure and stop the run cleanly (fix halt, error soft)."""
        types = self.lmp.numpy.extract_atom("type", nelem=len(tags))
        pieces = self.comm.gather((tags, positions.copy(), np.array(types)), root=0)
        self.stopped_uncertain = (int(step), largest)
        self.lmp.set_internal_variable(UNCERTAIN_VARIABLE, 1.0)
        if self.comm.rank != 0:
            return
        all_tags = np.concatenate([p[0] for p in pieces])
        order = np.argsort(all_tags)
        all_positions = np.concatenate([p[1] for p in pieces])[order]
        all_types = np.concatenate([p[2] for p in pieces])[order]
        box = self._box
        atoms = ase.Atoms(
            symbols=[self.types[t - 1] for t in all_types],
            positions=all_positions - box.origin,
            cell=box.cell,
            pbc=box.periodic,
        )
        atoms.info.update(step=int(step), max_energy_uncertainty=largest)
        message = (
            f"pes_calc: step {step}: largest per-atom energy uncertainty "
            f"{largest:.4g} eV > --max-uncertainty {self.max_uncertainty} eV; "
            "stopping the run"
        )
        if self.record_to is not None:
            # parallel=False: ASE would otherwise run MPI collectives on rank 0 alone
            ase.io.write(
                self.record_to, atoms, format="extxyz", append=True, parallel=False
            )
            message += f" (structure appended to {self.record_to})"
        print(message, file=sys.stderr, flush=True)
