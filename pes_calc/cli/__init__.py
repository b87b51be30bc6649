"""The ``pes-calc`` command line: compile, inspect, train, evaluate and run models.

One module per group of commands (`models`, `md`, `engines`, `training`); what they
share (user errors as one-line messages, output checks before any work) is in
`common`. Every command first makes the memory settings of
`pes_calc.reuse_freed_memory` (``PES_CALC_REUSE_FREED_MEMORY=0`` opts out).
"""

from __future__ import annotations

import click

from pes_calc.cli.common import (
    ATOMS_PER_THREAD,
    check_output_directory,
    check_output_path,
    default_md_threads,
)
from pes_calc.cli.engines import ipi_command, lammps_command
from pes_calc.cli.md import md_command
from pes_calc.cli.models import compile_command, info_command
from pes_calc.cli.training import active_learn_command, eval_command, train_command
from pes_calc.memory import reuse_freed_memory

__all__ = [
    "ATOMS_PER_THREAD",
    "check_output_directory",
    "check_output_path",
    "default_md_threads",
    "main",
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pes_calc")
def main() -> None:
    """pes-calc: compile, inspect and run machine-learned interatomic potentials."""
    # before any large tensor exists: torch reads THP_MEM_ALLOC_ENABLE once
    reuse_freed_memory()


for command in (
    compile_command,
    info_command,
    md_command,
    ipi_command,
    lammps_command,
    train_command,
    active_learn_command,
    eval_command,
):
    main.add_command(command)
