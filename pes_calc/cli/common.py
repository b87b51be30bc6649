"""What the ``pes-calc`` commands share: user errors as clean messages, output
checks before any work, torch set-up, reading a structure."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import ase
import ase.io
import click
import torch

from pes_calc.choices import DTYPES
from pes_calc.config import ConfigError
from pes_calc.io import ModelFileError
from pes_calc.ipi import IPIError
from pes_calc.lammps._library import LammpsUnavailableError
from pes_calc.neighbors import UnknownSpeciesError
from pes_calc.train import DatasetError

# what bad input raises anywhere below a command: shown as one line, no traceback
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    DatasetError,
    ModelFileError,
    UnknownSpeciesError,
    IPIError,
    LammpsUnavailableError,
    ValueError,
    NotImplementedError,
    FloatingPointError,
)
Command = TypeVar("Command", bound=Callable[..., Any])

# the MODEL argument of every command that reads a model file
model_argument = click.argument(
    "model", type=click.Path(exists=True, dir_okay=False, path_type=Path)
)


def dtype_option(
    text: str = "Float type to run in (default: the model's).",
) -> Callable[[Command], Command]:
    """The ``--dtype`` option: a name from `pes_calc.choices.DTYPES`, or None."""
    return click.option(
        "--dtype", type=click.Choice(sorted(DTYPES)), default=None, help=text
    )


def user_errors(interrupted: str | None = None) -> Callable[[Command], Command]:
    """Turn `USER_ERRORS` into click errors (exit code 1, the message alone);
    ``interrupted``: what to say on Ctrl-C (e.g. how to resume)."""

    def decorate(command: Command) -> Command:
        @functools.wraps(command)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            try:
                return command(*args, **kwargs)
            except click.ClickException:
                raise
            except USER_ERRORS as error:
                raise click.ClickException(str(error)) from error
            except KeyboardInterrupt:
                if interrupted is None:
                    raise
                raise click.ClickException(f"interrupted; {interrupted}") from None

        return wrapped  # type: ignore[return-value]

    return decorate


ATOMS_PER_THREAD = 4096


def default_md_threads(num_atoms: int) -> int:
    """CPU threads for MD when --threads is not given: one per 4096 atoms, up to the
    cores this process may use. Measured (scripts/thread_scan.py, README Threads):
    below a few thousand atoms a second thread gains at most 20% on a quiet machine
    and costs 1.5-4x beside one busy process; at 16384 atoms two threads take
    0.45x (quiet) to 0.71x (busy) the time of one."""
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    return max(1, min(cores, num_atoms // ATOMS_PER_THREAD))


def check_output_directory(path: Path, option: str) -> None:
    """Refuse, before any work, a run directory that could not be made or written."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        message = f"{existing} is a file, not a directory"
        raise click.BadParameter(message, param_hint=option)
    if not os.access(existing, os.W_OK):
        message = f"{existing} cannot be written here"
        raise click.BadParameter(message, param_hint=option)


def check_output_path(path: Path | None, option: str) -> None:
    """Refuse, before any work, an output file that could not be written."""
    if path is None:
        return
    directory = path.parent if str(path.parent) else Path()
    if path.is_dir():
        raise click.BadParameter(f"{path} is a directory", param_hint=option)
    if not directory.is_dir():
        raise click.BadParameter(
            f"the directory {directory} does not exist (create it first)",
            param_hint=option,
        )
    writable = os.access(path if path.exists() else directory, os.W_OK)
    if not writable:
        raise click.BadParameter(f"{path} cannot be written here", param_hint=option)


def set_up_torch(device: str | None, threads: int | None) -> None:
    """Refuse --device cuda without a GPU; apply --threads."""
    check_device(device)
    if threads is not None:
        torch.set_num_threads(threads)


def check_device(device: str | None) -> None:
    if (device or "").startswith("cuda") and not torch.cuda.is_available():
        raise click.UsageError("--device cuda was asked for but no CUDA GPU is visible")


def read_structure(structure: Path, index: str) -> ase.Atoms:
    """One frame of a structure file, or a click error saying why not."""
    try:
        atoms = ase.io.read(structure, index=index)
    except Exception as error:  # ASE raises many kinds for unreadable files
        raise click.ClickException(
            f"could not read frame {index} of {structure} as a structure "
            f"({type(error).__name__}: {error})"
        ) from error
    if not isinstance(atoms, ase.Atoms):
        raise click.ClickException(f"--index {index} selects more than one frame")
    return atoms
