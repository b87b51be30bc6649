"""``pes-calc md``: molecular dynamics with a model in ASE, optionally watching
its LLPR uncertainty."""

from __future__ import annotations

from pathlib import Path

import click
import torch

from pes_calc.calculator import PESCalculator
from pes_calc.choices import DTYPES
from pes_calc.cli.common import (
    check_output_path,
    default_md_threads,
    dtype_option,
    model_argument,
    read_structure,
    set_up_torch,
    user_errors,
)
from pes_calc.md import Ensemble, Thermostat, UncertaintyWatch, run_md


@click.command("md")
@model_argument
@click.argument(
    "structure", type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--index",
    default="0",
    show_default=True,
    help="Frame of STRUCTURE to start from (ASE index, e.g. -1).",
)
@click.option(
    "--ensemble",
    type=click.Choice(["nve", "nvt", "npt"]),
    default="nve",
    show_default=True,
)
@click.option(
    "--temperature",
    type=float,
    default=300.0,
    show_default=True,
    help="Initial velocities and thermostat target, K.",
)
@click.option("--steps", type=click.IntRange(min=0), default=1000, show_default=True)
@click.option("--timestep", type=float, default=1.0, show_default=True, help="fs.")
@click.option(
    "--thermostat",
    type=click.Choice(["langevin", "bussi"]),
    default="langevin",
    show_default=True,
    help="NVT thermostat.",
)
@click.option(
    "--friction",
    type=float,
    default=0.01,
    show_default=True,
    help="Langevin friction, 1/fs.",
)
@click.option(
    "--tdamp",
    type=float,
    default=None,
    help="Thermostat time constant (bussi, npt), fs [100 timesteps].",
)
@click.option(
    "--pdamp",
    type=float,
    default=None,
    help="Barostat time constant (npt), fs [1000 timesteps].",
)
@click.option(
    "--pressure",
    type=float,
    default=0.0,
    show_default=True,
    help="External pressure for npt, GPa.",
)
@click.option(
    "--trajectory",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write frames to this .traj or .xyz file.",
)
@click.option(
    "--trajectory-interval", type=click.IntRange(min=1), default=10, show_default=True
)
@click.option(
    "--log",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write step, time, energies, T (and volume) to this file.",
)
@click.option(
    "--log-interval", type=click.IntRange(min=1), default=10, show_default=True
)
@click.option("--device", default=None, help="cpu or cuda [cuda when available].")
@dtype_option()
@click.option("--seed", type=int, default=None, help="Seed of velocities and noise.")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="torch CPU threads [one per 4096 atoms, up to the cores].",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option(
    "--max-uncertainty",
    type=click.FloatRange(min=0),
    default=None,
    help="LLPR models: act when the uncertainty measure exceeds this, in "
    "its unit (eV/Å, eV or eV/atom).",
)
@click.option(
    "--on-uncertain",
    type=click.Choice(["stop", "record"]),
    default=None,
    help="Over --max-uncertainty: end the run, or record the structure "
    "and go on [stop].",
)
@click.option(
    "--uncertainty-measure",
    type=click.Choice(["forces", "energy", "energy_per_atom"]),
    default=None,
    help="Max per-atom force σ (eV/Å), energy σ (eV) or energy σ per atom "
    "(eV/atom) [forces].",
)
@click.option(
    "--uncertainty-interval",
    type=click.IntRange(min=1),
    default=None,
    help="Check every K steps; each check computes the force ensemble, "
    "a few MD steps' worth [1].",
)
@click.option(
    "--uncertain-structures",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Append structures over --max-uncertainty to this .xyz file "
    "[with record: uncertain.xyz next to --trajectory, or here].",
)
@click.option(
    "--uncertainty-log",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write step, time (fs), energy σ (eV) and max force σ (eV/Å) at each check.",
)
@user_errors()
def md_command(
    model: Path,
    structure: Path,
    index: str,
    ensemble: Ensemble,
    temperature: float,
    steps: int,
    timestep: float,
    thermostat: Thermostat,
    friction: float,
    tdamp: float | None,
    pdamp: float | None,
    pressure: float,
    trajectory: Path | None,
    trajectory_interval: int,
    log: Path | None,
    log_interval: int,
    device: str | None,
    dtype: str | None,
    seed: int | None,
    threads: int | None,
    quiet: bool,
    max_uncertainty: float | None,
    on_uncertain: str | None,
    uncertainty_measure: str | None,
    uncertainty_interval: int | None,
    uncertain_structures: Path | None,
    uncertainty_log: Path | None,
) -> None:
    """Run molecular dynamics with MODEL on STRUCTURE (any ASE-readable file).

    MODEL is a .safetensors model or a compiled .pt. Prints a summary at the end.
    With an LLPR model, any --*uncertain* option watches the uncertainty of the
    current structure (pes_calc.md.UncertaintyWatch) and reports the largest seen.
    """
    uncertainty_options = {
        "--max-uncertainty": max_uncertainty,
        "--on-uncertain": on_uncertain,
        "--uncertainty-measure": uncertainty_measure,
        "--uncertainty-interval": uncertainty_interval,
        "--uncertain-structures": uncertain_structures,
        "--uncertainty-log": uncertainty_log,
    }
    uncertainty_used = [
        name for name, value in uncertainty_options.items() if value is not None
    ]
    for name in ("--on-uncertain", "--uncertain-structures"):
        if name in uncertainty_used and max_uncertainty is None:
            raise click.UsageError(f"{name} needs --max-uncertainty")
    if on_uncertain == "record" and uncertain_structures is None:
        directory = trajectory.parent if trajectory is not None else Path()
        uncertain_structures = directory / "uncertain.xyz"
    for option, path in (
        ("--trajectory", trajectory),
        ("--log", log),
        ("--uncertain-structures", uncertain_structures),
        ("--uncertainty-log", uncertainty_log),
    ):
        check_output_path(path, option)
    atoms = read_structure(structure, index)
    threads = threads or default_md_threads(len(atoms))
    set_up_torch(device, threads)
    watch = None
    try:
        calculator = PESCalculator(
            model, device=device, dtype=DTYPES[dtype] if dtype else None
        )
        if uncertainty_used and not calculator.is_llpr:
            raise click.UsageError(
                f"{', '.join(uncertainty_used)} "
                f"{'needs' if len(uncertainty_used) == 1 else 'need'} an LLPR model; "
                f"{model} has no "
                "uncertainties (wrap a trained model with pes_calc.train.llpr.wrap, or "
                "train one with architecture name llpr)"
            )
        if uncertainty_used:
            watch = UncertaintyWatch(
                max_uncertainty,
                measure=uncertainty_measure or "forces",
                on_uncertain=on_uncertain or "stop",
                record_to=uncertain_structures,
                log=uncertainty_log,
                interval=uncertainty_interval or 1,
            )
        summary = run_md(
            calculator,
            atoms,
            ensemble=ensemble,
            temperature=temperature,
            steps=steps,
            timestep=timestep,
            thermostat=thermostat,
            friction=friction,
            tdamp=tdamp,
            pdamp=pdamp,
            pressure=pressure,
            trajectory=trajectory,
            trajectory_interval=trajectory_interval,
            log=log,
            log_interval=log_interval,
            progress=not quiet,
            seed=seed,
            observers=[watch] if watch is not None else [],
        )
    finally:
        if watch is not None:
            watch.close()
    click.echo(str(summary))
    click.echo(f"  threads            {torch.get_num_threads()}")
    files = [
        ("trajectory", trajectory),
        ("log", log),
        ("uncertainty log", uncertainty_log),
    ]
    for name, path in files:
        if path is not None:
            click.echo(f"  {name:<18} {path}")
    if watch is not None and uncertain_structures is not None:
        click.echo(
            f"  {'uncertain':<18} {len(watch.recorded)} structures appended "
            f"to {uncertain_structures}"
        )
