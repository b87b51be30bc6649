"""``pes-calc ipi`` and ``pes-calc lammps``: serve a model to the engines, i-PI as a
socket client, LAMMPS as the forces of a ``fix external`` under MPI."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pes_calc.choices import DTYPES
from pes_calc.cli.common import (
    check_device,
    dtype_option,
    model_argument,
    read_structure,
    set_up_torch,
    user_errors,
)
from pes_calc.ipi import parse_address, serve

# the LAMMPS extra itself is imported when a run starts (a clear error if missing)
from pes_calc.lammps.script import LammpsRunError, run_input


@click.command("ipi")
@model_argument
@click.option(
    "--structure",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The system i-PI simulates (any ASE-readable file): species, atom "
    "order and periodicity; i-PI sends only positions and cell.",
)
@click.option(
    "--index",
    default="0",
    show_default=True,
    help="Frame of --structure to use (ASE index).",
)
@click.option(
    "--address",
    metavar="HOST:PORT",
    default=None,
    help="i-PI's inet socket (<ffsocket mode='inet'>); port 31415 if "
    "only HOST is given.",
)
@click.option(
    "--unix",
    metavar="NAME",
    default=None,
    help="i-PI's unix socket <address>NAME</address>, the file "
    "/tmp/ipi_NAME (a NAME with a / is the whole path).",
)
@click.option("--device", default=None, help="cpu or cuda [cuda when available].")
@dtype_option()
@click.option(
    "--skin",
    type=click.FloatRange(min=0),
    default=0.5,
    show_default=True,
    help="Verlet skin of the neighbor list, Å.",
)
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Keep trying to connect for this many seconds while i-PI starts.",
)
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads."
)
@click.option(
    "--log-interval",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Report every N requests.",
)
@click.option("--quiet", is_flag=True, help="No progress on stderr.")
@user_errors()
def ipi_command(
    model: Path,
    structure: Path,
    index: str,
    address: str | None,
    unix: str | None,
    device: str | None,
    dtype: str | None,
    skin: float,
    wait: float,
    threads: int | None,
    log_interval: int,
    quiet: bool,
) -> None:
    """Serve MODEL's energies, forces and virials to an i-PI server.

    Connects to i-PI at --address HOST:PORT or --unix NAME and computes each
    configuration i-PI sends (ASE's implementation of the i-PI socket protocol;
    atomic units on the wire) until i-PI sends EXIT or closes the connection.
    Start several clients to share the beads or replicas of a step. Progress
    (requests served, ms per request) goes to stderr.
    """
    if (address is None) == (unix is None):
        raise click.UsageError("give one of --address HOST:PORT or --unix NAME")
    if address is not None:
        try:
            parse_address(address)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--address") from None
    set_up_torch(device, threads)
    atoms = read_structure(structure, index)
    serve(
        model,
        atoms,
        address=address,
        unix=unix,
        device=device,
        dtype=DTYPES[dtype] if dtype else None,
        skin=skin,
        wait=wait,
        log=None if quiet else sys.stderr,
        log_interval=log_interval,
    )


@click.command("lammps")
@click.argument(
    "input_file",
    metavar="IN.lammps",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
@click.argument("more_types", nargs=-1, metavar="")
@click.option(
    "--model",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Model file: .safetensors, .pt (TorchScript) or .pt2 (AOTInductor).",
)
@click.option(
    "--types",
    "first_type",
    required=True,
    metavar="A [B ...]",
    help="Element of each LAMMPS atom type, in type order, as pair_coeff "
    "* * A B would name them.",
)
@click.option(
    "--fix",
    default=None,
    help="ID of the input's `fix ID all external pf/callback 1 1` "
    "[the first fix external].",
)
@click.option("--device", default=None, help="cpu, cuda or cuda:N [cpu].")
@dtype_option()
@click.option(
    "--skin",
    type=click.FloatRange(min=0),
    default=0.5,
    show_default=True,
    help="pes_calc's Verlet skin between LAMMPS re-neighborings, Å.",
)
@click.option(
    "--neighbor-skin",
    type=click.FloatRange(min=0),
    default=None,
    help="LAMMPS's neighbor skin, Å [the input's `neighbor` value, else 2].",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="torch CPU threads per rank [cores / ranks on the node].",
)
@click.option(
    "--max-uncertainty",
    type=click.FloatRange(min=0),
    default=None,
    help="LLPR models: stop the run when an atom's energy uncertainty "
    "exceeds this, eV.",
)
@click.option(
    "--record-to",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("runs/lammps-uncertain.xyz"),
    show_default=True,
    help="Where --max-uncertainty appends the structure that stopped the run.",
)
@click.option(
    "--log",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="LAMMPS log file [log.lammps].",
)
@click.option(
    "--var",
    "variables",
    nargs=2,
    multiple=True,
    metavar="NAME VALUE",
    help="Set a LAMMPS index variable, as lmp -var NAME VALUE.",
)
@click.option("--quiet", is_flag=True, help="No LAMMPS output on the screen.")
@user_errors()
def lammps_command(
    input_file: Path,
    more_types: tuple[str, ...],
    model: Path,
    first_type: str,
    fix: str | None,
    device: str | None,
    dtype: str | None,
    skin: float,
    neighbor_skin: float | None,
    threads: int | None,
    max_uncertainty: float | None,
    record_to: Path,
    log: Path | None,
    variables: tuple[tuple[str, str], ...],
    quiet: bool,
) -> None:
    """Run the LAMMPS input IN.lammps with MODEL as its `fix external` forces.

    The input keeps its units (metal), fixes, thermo, dumps and restarts, and
    holds `fix mlip all external pf/callback 1 1` after the atoms exist; pes_calc
    sets the ghost cutoff (comm_modify) and the fix's energy and virial. Run on N
    MPI ranks with `mpiexec -n N pes-calc lammps ...`. LLPR models write each
    atom's energy uncertainty (eV) to the per-atom property d_energy_uncertainty,
    which `dump custom` can list.
    """
    check_device(device)
    types = first_type.replace(",", " ").split() + list(more_types)
    if max_uncertainty is not None:
        record_to.parent.mkdir(parents=True, exist_ok=True)
    lammps_args = ["-log", str(log) if log else "log.lammps"]
    if quiet:
        lammps_args += ["-screen", "none"]
    for name, value in variables:
        lammps_args += ["-var", name, value]
    try:
        summary = run_input(
            input_file,
            model,
            types,
            fix,
            device=device,
            dtype=dtype,
            skin=skin,
            neighbor_skin=neighbor_skin,
            max_uncertainty=max_uncertainty,
            record_to=record_to,
            threads=threads,
            lammps_args=lammps_args,
        )
    except LammpsRunError as error:
        raise click.ClickException(str(error)) from error
    if summary["rank"] == 0:
        click.echo(
            f"pes-calc lammps: {summary['force_calls']} force calls on "
            f"{summary['ranks']} rank(s) x {summary['threads']} thread(s), "
            f"{1000 * summary['seconds_per_call']:.2f} ms per call (slowest rank), "
            f"{summary['neighbor_list_builds']} neighbor-list builds, ghost cutoff "
            f"{summary['ghost_cutoff']:.2f} Å",
            err=True,
        )
        if summary["stopped_uncertain"] is not None:
            step, largest = summary["stopped_uncertain"]
            click.echo(
                f"pes-calc lammps: stopped at step {step}: an atom's energy "
                f"uncertainty {largest:.4g} eV > --max-uncertainty "
                f"{max_uncertainty} eV "
                f"(structure appended to {record_to})",
                err=True,
            )
