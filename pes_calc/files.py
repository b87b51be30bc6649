"""Files written so that an interruption never leaves half of one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(temporary_path)``, then rename the result onto ``path``.

    The rename is atomic on one file system: readers see the old file or the
    whole new one. The temporary name carries the process id, so two processes
    writing the same path never share a half-written file.
    """
    path = Path(path)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(str(temporary))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write` of a text file."""
    atomic_write(path, lambda temporary: Path(temporary).write_text(text))
