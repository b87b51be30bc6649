"""A rank's share of a LAMMPS box: which atoms make its graph, and who owns them.

LAMMPS gives each rank its local atoms and ghost atoms: copies of atoms within the
communication cutoff of its sub-domain, shifted by box vectors where the box is
periodic. pes_calc keeps the cell's periodicity along every direction that one
rank spans alone (all of them on one rank) and lets vesin find those images, so
the graph there is the graph `PESCalculator` builds. Ghosts are kept only where
they stand for atoms across a sub-domain face: one copy per atom and image class
along the split directions. Everything here is numpy on LAMMPS's arrays; nothing
talks to MPI.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Box(NamedTuple):
    """LAMMPS's (restricted triclinic) box and this rank's sub-domain."""

    origin: np.ndarray
    """(3,) boxlo, Å."""
    cell: np.ndarray
    """(3, 3) row vectors a = (lx, 0, 0), b = (xy, ly, 0), c = (xz, yz, lz), Å."""
    periodic: np.ndarray
    """(3,) bool: periodic boundaries along a, b, c."""
    sub_lo: np.ndarray
    """(3,) this rank's sub-domain in fractional coordinates, lower corner."""
    sub_hi: np.ndarray
    """(3,) upper corner (exclusive)."""
    procgrid: np.ndarray
    """(3,) ranks along each direction."""

    @property
    def spanned(self) -> np.ndarray:
        """(3,) bool: periodic directions that one rank spans, periodic in the graph."""
        return self.periodic & (self.procgrid == 1)

    @property
    def volume(self) -> float:
        return float(abs(np.linalg.det(self.cell)))


def read_box(lmp) -> Box:  # noqa: ANN001 (a lammps.lammps)
    """The box and sub-domain of the calling rank, from a LAMMPS instance."""
    boxlo, boxhi, xy, yz, xz, periodicity, _ = lmp.extract_box()
    origin = np.asarray(boxlo, dtype=np.float64)
    lengths = np.asarray(boxhi, dtype=np.float64) - origin
    cell = np.array(
        [[lengths[0], 0.0, 0.0], [xy, lengths[1], 0.0], [xz, yz, lengths[2]]]
    )
    if lmp.extract_setting("triclinic"):
        sub_lo = np.asarray(lmp.extract_global("sublo_lambda"), dtype=np.float64)
        sub_hi = np.asarray(lmp.extract_global("subhi_lambda"), dtype=np.float64)
    else:
        sub_lo = (np.asarray(lmp.extract_global("sublo")) - origin) / lengths
        sub_hi = (np.asarray(lmp.extract_global("subhi")) - origin) / lengths
    return Box(
        origin=origin,
        cell=cell,
        periodic=np.asarray(periodicity, dtype=bool),
        sub_lo=sub_lo,
        sub_hi=sub_hi,
        procgrid=np.asarray(lmp.extract_global("procgrid"), dtype=np.int64),
    )


def fractional(positions: np.ndarray, box: Box) -> np.ndarray:
    """(n, 3) fractional coordinates λ with positions = origin + λ @ cell."""
    return np.linalg.solve(box.cell.T, (positions - box.origin).T).T


class GhostSelection(NamedTuple):
    """The ghost atoms a rank's graph keeps, in LAMMPS's ghost numbering."""

    kept: np.ndarray
    """(G,) int64 indices (≥ nlocal) of kept ghosts into LAMMPS's atom arrays."""
    owner_local: np.ndarray
    """(G,) int64 local index of the same atom where this rank owns it, else -1."""


def select_ghosts(
    tags: np.ndarray, positions: np.ndarray, nlocal: int, box: Box
) -> GhostSelection:
    """Keep one ghost per atom and image class along the split directions.

    ``tags`` and ``positions`` cover local and ghost atoms (LAMMPS order, locals
    first). A ghost that differs from another copy of its atom only by box vectors
    along spanned directions is dropped: the graph's periodicity makes it. Copies
    are matched by atom tag and the integer box-vector offset between them, so
    floating-point noise at a boundary cannot duplicate or lose an atom.
    """
    ghost_tags = tags[nlocal:]
    if len(ghost_tags) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return GhostSelection(empty, empty)
    lam = fractional(positions, box)
    split = ~box.spanned  # offsets along spanned directions do not count
    local_of = local_index_lookup(tags[:nlocal])
    owner_local = local_of(ghost_tags)
    ghost_lam = lam[nlocal:]

    # a copy's reference: the local atom, or the first ghost copy of a remote atom
    _, first, inverse = np.unique(ghost_tags, return_index=True, return_inverse=True)
    reference_lam = ghost_lam[first[inverse.reshape(-1)]]
    own = owner_local >= 0
    reference_lam[own] = lam[owner_local[own]]
    offsets = np.rint(ghost_lam - reference_lam).astype(np.int64) * split

    # one copy per (atom, offset along split directions); an own atom's offset 0 is
    # the local atom itself, so its ghosts count only across split directions
    keys = np.concatenate([ghost_tags[:, None].astype(np.int64), offsets], axis=1)
    _, first_key = np.unique(keys, axis=0, return_index=True)
    keep = np.zeros(len(ghost_tags), dtype=bool)
    keep[first_key] = True
    keep &= ~(own & np.all(offsets == 0, axis=1))
    kept = np.flatnonzero(keep)
    return GhostSelection(kept + nlocal, owner_local[kept])


def local_index_lookup(local_tags: np.ndarray):  # noqa: ANN201
    """A function tags → local index (or -1), over this rank's local tags."""
    order = np.argsort(local_tags, kind="stable")
    sorted_tags = local_tags[order]

    def lookup(query: np.ndarray) -> np.ndarray:
        if len(sorted_tags) == 0:
            return np.full(len(query), -1, dtype=np.int64)
        position = np.minimum(np.searchsorted(sorted_tags, query), len(sorted_tags) - 1)
        found = sorted_tags[position] == query
        return np.where(found, order[position], -1).astype(np.int64)

    return lookup


def guess_owners(
    lam: np.ndarray, box: Box, all_sub_lo: np.ndarray, all_sub_hi: np.ndarray
) -> np.ndarray:
    """(n,) rank whose sub-domain holds each fractional position (wrapped where
    periodic), or -1. ``all_sub_lo``/``all_sub_hi`` are (P, 3), one row per rank.

    LAMMPS assigns an atom to the rank whose sub-domain contains it at the last
    re-neighboring; near a face, rounding can pick the neighbor instead, which
    the caller checks with the guessed owner.
    """
    wrapped = np.where(box.periodic, lam - np.floor(lam), lam)
    wrapped = np.clip(wrapped, 0.0, np.nextafter(1.0, 0.0))
    owners = np.full(len(lam), -1, dtype=np.int64)
    if len(lam) == 0:
        return owners
    # brick decomposition: planes shared along each direction (uniform or balanced)
    planes = [np.unique(all_sub_lo[:, d]) for d in range(3)]
    cells = np.stack(
        [np.searchsorted(planes[d], wrapped[:, d], side="right") - 1 for d in range(3)],
        axis=1,
    )
    rank_cells = np.stack(
        [
            np.searchsorted(planes[d], all_sub_lo[:, d], side="right") - 1
            for d in range(3)
        ],
        axis=1,
    )
    grid_shape = [len(p) for p in planes]
    if np.prod(grid_shape) != len(all_sub_lo):
        return owners  # not a brick (comm_style tiled): the caller asks every rank
    grid = np.full(grid_shape, -1, dtype=np.int64)
    grid[rank_cells[:, 0], rank_cells[:, 1], rank_cells[:, 2]] = np.arange(
        len(all_sub_lo)
    )
    return grid[cells[:, 0], cells[:, 1], cells[:, 2]]
