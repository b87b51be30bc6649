"""Reverse communication: forces on ghost atoms go back to the ranks that own them.

A rank's energy is the sum of its local atoms' energies; its derivative has terms on
ghost coordinates too (a local atom's energy depends on the ghosts around it). Those
terms belong to the ghosts' owners: LAMMPS does this sum for pair styles
(``newton on``), but a ``fix external`` sees only local forces, so pes_calc does it
over mpi4py. The plan (who sends which atom to whom) is made once per LAMMPS
re-neighboring; each step then costs one ``Alltoallv`` of 3 floats per ghost.

Owners are found without any global list of atoms: a ghost's wrapped fractional
position names the sub-domain that held it at re-neighboring, that rank confirms
the tag, and only tags that no guessed owner confirms (an atom on a face, rounded
to the neighbor) are asked of every rank.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pes_calc.lammps._library import import_mpi
from pes_calc.lammps.domain import Box, guess_owners, local_index_lookup


class SingleRank:
    """The few communicator calls pes_calc makes, for a run on one rank without
    mpi4py (all reductions of one value are that value)."""

    rank = 0
    size = 1

    def allgather(self, value: Any) -> list[Any]:
        return [value]

    def gather(self, value: Any, root: int = 0) -> list[Any]:
        return [value]


class ReverseExchange:
    """Sums values on ghost atoms into the local atoms of their owners."""

    def __init__(self, comm: Any):
        self.comm = comm
        self.unowned = 0  # ghosts no rank owns at the last plan (an error upstream)
        self._send_order = np.zeros(0, dtype=np.int64)
        self._send_counts = np.zeros(comm.size, dtype=np.int64)
        self._recv_counts = np.zeros(comm.size, dtype=np.int64)
        self._recv_local = np.zeros(0, dtype=np.int64)

    def plan(
        self, tags: np.ndarray, lam: np.ndarray, box: Box, local_tags: np.ndarray
    ) -> None:
        """Who owns each remote ghost ``tags`` (unique, fractional positions ``lam``).

        Collective: every rank calls it at the same step.
        """
        if self.comm.size == 1:
            self.unowned = len(tags)
            return
        lookup = local_index_lookup(local_tags)
        bounds = np.array(self.comm.allgather(np.concatenate([box.sub_lo, box.sub_hi])))
        owners = guess_owners(lam, box, bounds[:, :3], bounds[:, 3:])
        owners[owners == self.comm.rank] = -1  # a remote tag is not ours: ask around
        found = self._ask(tags, owners, lookup)
        missing = np.flatnonzero(~found)
        if self.comm.allreduce(len(missing), op=_mpi().MAX) > 0:
            owners[missing] = self._ask_everyone(tags[missing], lookup)
            found = self._ask(tags, owners, lookup)
        self.unowned = int(np.count_nonzero(~found))

    def _ask(self, tags: np.ndarray, owners: np.ndarray, lookup: Any) -> np.ndarray:
        """Send each tag to its guessed owner; keep the plan; True where confirmed."""
        MPI = _mpi()
        valid = np.flatnonzero(owners >= 0)
        order = valid[np.argsort(owners[valid], kind="stable")]
        send_counts = np.bincount(owners[order], minlength=self.comm.size).astype(
            np.int64
        )
        recv_counts = np.array(self.comm.alltoall(send_counts.tolist()), dtype=np.int64)
        received = np.empty(int(recv_counts.sum()), dtype=np.int64)
        self.comm.Alltoallv(
            [
                np.ascontiguousarray(tags[order], dtype=np.int64),
                (send_counts, _displacements(send_counts)),
                MPI.INT64_T,
            ],
            [received, (recv_counts, _displacements(recv_counts)), MPI.INT64_T],
        )
        local = lookup(received)
        answers = np.empty(len(order), dtype=np.int64)
        self.comm.Alltoallv(
            [
                (local >= 0).astype(np.int64),
                (recv_counts, _displacements(recv_counts)),
                MPI.INT64_T,
            ],
            [answers, (send_counts, _displacements(send_counts)), MPI.INT64_T],
        )
        found = np.zeros(len(tags), dtype=bool)
        found[order] = answers.astype(bool)
        # rows an owner did not confirm are sent as zeros and dropped on arrival
        self._send_order, self._send_counts, self._recv_counts = (
            order,
            send_counts,
            recv_counts,
        )
        self._recv_local = local
        return found

    def _ask_everyone(self, tags: np.ndarray, lookup: Any) -> np.ndarray:
        """Owner rank of each of ``tags`` from every rank's answer (-1: nobody)."""
        MPI = _mpi()
        asked = self.comm.allgather(tags)
        everything = np.concatenate(asked) if asked else np.zeros(0, dtype=np.int64)
        mine = np.where(lookup(everything) >= 0, self.comm.rank, -1).astype(np.int64)
        owners = np.empty_like(mine)
        self.comm.Allreduce(mine, owners, op=MPI.MAX)
        start = sum(len(a) for a in asked[: self.comm.rank])
        return owners[start : start + len(tags)]

    def send(self, values: np.ndarray, into: np.ndarray) -> None:
        """Add ``values`` (one row per planned tag, float64 (n, k)) to ``into``, the
        owners' local arrays (nlocal, k). Collective."""
        if self.comm.size == 1:
            return
        MPI = _mpi()
        width = values.shape[1]
        outgoing = np.ascontiguousarray(values[self._send_order], dtype=np.float64)
        incoming = np.empty((int(self._recv_counts.sum()), width), dtype=np.float64)
        self.comm.Alltoallv(
            [
                outgoing,
                (self._send_counts * width, _displacements(self._send_counts) * width),
                MPI.DOUBLE,
            ],
            [
                incoming,
                (self._recv_counts * width, _displacements(self._recv_counts) * width),
                MPI.DOUBLE,
            ],
        )
        confirmed = self._recv_local >= 0
        np.add.at(into, self._recv_local[confirmed], incoming[confirmed])


def _displacements(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def _mpi() -> Any:
    return import_mpi()
