"""The extxyz files of a loop: read whole, written whole (never half of one)."""

from __future__ import annotations

from pathlib import Path

import ase
import ase.io

from pes_calc.files import atomic_write

__all__ = ["read_xyz", "write_xyz"]


def read_xyz(path: Path) -> list[ase.Atoms]:
    """Every frame of an extxyz file; an empty or absent file has none."""
    if not path.exists() or path.stat().st_size == 0:
        return []
    return list(ase.io.read(path, index=":", format="extxyz"))


def write_xyz(path: Path, structures: list[ase.Atoms]) -> None:
    """``structures`` as the extxyz file ``path`` (an empty file for none),
    written atomically."""

    def write(temporary: str) -> None:
        with open(temporary, "w") as handle:
            for atoms in structures:
                ase.io.write(handle, atoms, format="extxyz")

    atomic_write(path, write)
