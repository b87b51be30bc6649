"""Run a user's LAMMPS input file with a pes_calc model (``pes-calc lammps``).

LAMMPS reads the input itself, loops, variables and includes included; pes_calc
only needs to step in once, between the line that defines the ``fix external``
and the first ``run``. So the input is cut after that line: LAMMPS reads the first
part, `attach` couples the model, and LAMMPS reads the rest.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pes_calc.lammps import DEFAULT_NEIGHBOR_SKIN, attach, ghost_cutoff
from pes_calc.lammps._library import import_lammps, import_mpi


class LammpsRunError(RuntimeError):
    """The input, the model or the run cannot go on; the message says why."""


@dataclass
class InputParts:
    """An input file cut after its ``fix ID group external pf/callback`` line."""

    before: str
    after: str
    fix: str
    neighbor_skin: float | None
    """The skin of the input's last ``neighbor`` command with a number, Å."""


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(last physical line index, command without comment) per LAMMPS command."""
    commands: list[tuple[int, str]] = []
    pending = ""
    for index, line in enumerate(text.splitlines()):
        line = _strip_comment(line)
        if line.rstrip().endswith("&"):
            pending += line.rstrip()[:-1] + " "
            continue
        commands.append((index, pending + line))
        pending = ""
    if pending:
        commands.append((len(text.splitlines()) - 1, pending))
    return commands


def _strip_comment(line: str) -> str:
    quote = None
    for position, char in enumerate(line):
        if char in "\"'" and quote in (None, char):
            quote = None if quote else char
        elif char == "#" and quote is None:
            return line[:position]
    return line


def split_input(
    text: str, fix: str | None = None, name: str = "the input"
) -> InputParts:
    """Cut ``text`` after the line defining ``fix external`` ``fix`` (the first
    fix external if ``fix`` is None)."""
    lines = text.splitlines()
    cut: int | None = None
    found_fix = None
    neighbor_skin = None
    for last_line, command in _logical_lines(text):
        words = command.split()
        if len(words) >= 2 and words[0] == "neighbor":
            with contextlib.suppress(ValueError):  # a ${variable}: keep the default
                neighbor_skin = float(words[1])
        if (
            cut is not None
            or len(words) < 4
            or words[0] != "fix"
            or words[3] != "external"
        ):
            continue
        if fix is not None and words[1] != fix:
            continue
        if len(words) < 5 or words[4] != "pf/callback":
            raise LammpsRunError(
                f"{name}: fix {words[1]} is `external {' '.join(words[4:5])}`; "
                f"pes_calc fills `fix {words[1]} {words[2]} external pf/callback 1 1`"
            )
        cut, found_fix = last_line, words[1]
    if cut is None:
        which = f"fix {fix}" if fix else "fix"
        raise LammpsRunError(
            f"{name} defines no `{which} ... external pf/callback` line (at its top "
            f"level: not in an include file); add, after the box and atoms exist:\n"
            f"  fix {fix or 'mlip'} all external pf/callback 1 1"
        )
    assert found_fix is not None
    return InputParts(
        before="\n".join(lines[: cut + 1]) + "\n",
        after="\n".join(lines[cut + 1 :]) + "\n",
        fix=found_fix,
        neighbor_skin=neighbor_skin,
    )


def _check_comm_cutoff(after: str, needed: float, name: str) -> None:
    """A later ``comm_modify cutoff`` below the ghost cutoff would lose ghost atoms."""
    for _, command in _logical_lines(after):
        words = command.split()
        if words[:1] == ["comm_modify"] and "cutoff" in words:
            value = words[words.index("cutoff") + 1] if words[-1] != "cutoff" else ""
            if re.fullmatch(r"[0-9.eE+-]+", value) and float(value) < needed:
                raise LammpsRunError(
                    f"{name}: `comm_modify cutoff {value}` after the fix is less than "
                    f"the {needed:.3f} Å of ghost atoms the model needs; remove it"
                )


def default_threads(comm: Any) -> int:
    """CPU threads per rank: the cores this process may use over the ranks on its
    node (oversubscribed threads slowed MD 14x in `pes-calc md`'s measurements)."""
    MPI = import_mpi()
    ranks_here = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size()
    return max(1, len(os.sched_getaffinity(0)) // ranks_here)


def run_input(
    path: str | os.PathLike,
    model: str | os.PathLike | torch.nn.Module,
    types: list[str],
    fix: str | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    skin: float = 0.5,
    neighbor_skin: float | None = None,
    max_uncertainty: float | None = None,
    record_to: str | os.PathLike | None = None,
    threads: int | None = None,
    lammps_args: list[str] | None = None,
) -> dict[str, Any]:
    """Run the LAMMPS input at ``path`` on every rank of COMM_WORLD with ``model``.

    Returns a summary (on every rank): force calls, seconds in them, neighbor-list
    builds, ranks, threads, the ghost cutoff and an uncertainty stop if any.
    Raises `LammpsRunError` on every rank, never on one alone (no MPI job hangs).
    """
    path = Path(path)
    MPI = import_mpi()
    comm = MPI.COMM_WORLD
    lammps = import_lammps()
    problem = None
    try:
        parts = split_input(path.read_text(), fix, name=str(path))
    except (OSError, UnicodeDecodeError, LammpsRunError) as error:
        problem = str(error)
    _raise_if_any(comm, problem)
    threads = threads or default_threads(comm)
    torch.set_num_threads(threads)
    skin_of_input = parts.neighbor_skin or DEFAULT_NEIGHBOR_SKIN
    lmp = lammps.lammps(cmdargs=list(lammps_args or []), comm=comm)
    coupling = None
    try:
        with tempfile.TemporaryDirectory(prefix="pes_calc_lammps_") as scratch:
            before, after = Path(scratch) / "before.in", Path(scratch) / "after.in"
            before.write_text(parts.before)
            after.write_text(parts.after)
            _lammps_file(lmp, before, comm)
            try:
                coupling = attach(
                    lmp,
                    model,
                    types,
                    parts.fix,
                    device=device,
                    dtype=dtype,
                    skin=skin,
                    neighbor_skin=neighbor_skin or skin_of_input,
                    max_uncertainty=max_uncertainty,
                    record_to=record_to,
                    comm=comm,
                )
                _check_comm_cutoff(
                    parts.after,
                    ghost_cutoff(coupling.calculator, coupling.neighbor_skin),
                    str(path),
                )
            except Exception as error:  # each rank loads its own model: agree first
                problem = (
                    f"{type(error).__name__}: {error}"
                    if not isinstance(error, (ValueError, LammpsRunError))
                    else str(error)
                )
            _raise_if_any(comm, problem)
            try:
                _lammps_file(lmp, after, comm)
            except LammpsRunError as error:
                if coupling is not None and coupling.error:
                    raise LammpsRunError(coupling.error) from error
                raise
    finally:
        lmp.close()
    assert coupling is not None
    calls = comm.allgather(
        (coupling.steps, coupling.seconds, coupling.neighbor_list_builds)
    )
    return {
        "rank": comm.rank,
        "ranks": comm.size,
        "threads": threads,
        "force_calls": calls[0][0],
        "seconds_per_call": max(c[1] / max(c[0], 1) for c in calls),
        "neighbor_list_builds": max(c[2] for c in calls),
        "ghost_cutoff": ghost_cutoff(coupling.calculator, coupling.neighbor_skin),
        "stopped_uncertain": coupling.stopped_uncertain,
    }


def _lammps_file(lmp: Any, path: Path, comm: Any) -> None:
    """``lmp.file`` with LAMMPS's errors as `LammpsRunError`; an error on one rank
    only (LAMMPS's MPI_Abort kind) ends the whole job at once."""
    try:
        lmp.file(str(path))
    except Exception as error:
        message = getattr(error, "message", None) or str(error)
        if type(error).__name__ == "MPIAbortException" and comm.size > 1:
            print(
                f"LAMMPS error on rank {comm.rank}: {message}",
                file=sys.stderr,
                flush=True,
            )
            comm.Abort(1)
        raise LammpsRunError(message) from error


def _raise_if_any(comm: Any, problem: str | None) -> None:
    """Raise on every rank if any rank has a problem (the first rank's message)."""
    problems = [p for p in comm.allgather(problem) if p]
    if problems:
        raise LammpsRunError(problems[0])
