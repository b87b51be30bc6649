"""The ``pes-calc`` command line: compile and inspect models."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click
import torch

from pes_calc.choices import DTYPES
from pes_calc.compile import MODIFIERS

if TYPE_CHECKING:
    import ase



@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pes_calc")
def main() -> None:
    """pes-calc: compile, inspect and run machine-learned interatomic potentials."""


@main.command("compile")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
    help="Where to write the compiled model (.pt for TorchScript, .pt2 for AOTInductor).",
)
@click.option(
    "--mode", type=click.Choice(["torchscript", "aotinductor"]), default="torchscript",
    show_default=True, help="Kind of compiled artefact.",
)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option(
    "--dtype", type=click.Choice(sorted(DTYPES)), default=None,
    help="Float type of the artefact (default: the model's).",
)
@click.option(
    "--modifiers", multiple=True, type=click.Choice(sorted(MODIFIERS)),
    help="Model modifiers to apply before compiling (repeatable).",
)
@click.option(
    "--threads", type=click.IntRange(min=1), default=None,
    help="CPU threads the AOTInductor package will run with (pes-calc md --threads); "
    "its loops are generated for that many (default: torch's, all cores).",
)
def compile_command(
    model: Path, output: Path, mode: str, device: str, dtype: str | None,
    modifiers: tuple[str, ...], threads: int | None,
) -> None:
    """Compile MODEL (.safetensors) into a self-describing artefact.

    AOTInductor packages take minutes to compile and are cached by weights, torch
    version, device, dtype, CPU threads and pes_calc's source in $PES_CALC_CACHE_DIR
    (default ~/.cache/pes_calc).
    """
    check_output_path(output, "--output")
    from pes_calc.compile import compile_model
    from pes_calc.io import ModelFileError, load_model

    _set_up_torch(device, threads)
    try:
        eager = load_model(model)
        compile_model(
            eager, output, mode=mode, device=device,
            dtype=DTYPES[dtype] if dtype else None, modifiers=modifiers,
        )
    except (ModelFileError, NotImplementedError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"wrote {output} ({mode}, {device}, {dtype or 'model dtype'})")


@main.command("info")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
def info_command(model: Path, as_json: bool) -> None:
    """Show what MODEL (.safetensors or compiled .pt) holds."""
    from pes_calc.artefacts import read_artefact_metadata
    from pes_calc.io import ModelFileError, is_checked, read_metadata

    try:
        if model.suffix == ".safetensors":
            metadata = read_metadata(model)
            metadata["artefact"] = "safetensors"
            metadata["integrity"] = (
                "SHA-256 of the metadata and of every tensor, checked at load"
                if is_checked(model)
                else "unchecked: written before pes_calc stored digests"
            )
            from safetensors import safe_open

            with safe_open(str(model), framework="pt") as handle:
                metadata["num_parameters"] = sum(
                    math.prod(handle.get_slice(name).get_shape())
                    for name in handle.keys()
                )
        else:
            metadata = read_artefact_metadata(model)
            metadata["integrity"] = (
                "SHA-256 of the whole archive, checked at load"
                if metadata.get("sealed")
                else "zip CRC-32 of every member, checked at load (unsealed)"
            )
    except ModelFileError as error:
        raise click.ClickException(str(error)) from error
    if as_json:
        click.echo(json.dumps(metadata, indent=2))
        return
    click.echo(f"{model}")
    rows = [
        ("artefact", metadata.get("artefact")),
        ("architecture", metadata["architecture"]),
        ("species", ", ".join(metadata["species"])),
        ("cutoff", f"{metadata['cutoff']} Å"),
        ("dtype", metadata["dtype"]),
        ("units", f"{metadata['units']['energy']}, {metadata['units']['length']}"),
        ("forces/stress", "yes" if metadata.get("do_derivatives", True) else "no"),
        ("stored values", metadata.get("num_parameters")),
        ("modifiers", ", ".join(metadata.get("modifiers", [])) or None),
        ("device", metadata.get("device")),
        ("torch", metadata.get("torch_version")),
        ("pes_calc", metadata.get("pes_calc_version")),
        ("integrity", metadata.get("integrity")),
    ]
    for name, value in rows:
        if value is not None:
            click.echo(f"  {name:<14} {value}")
    _echo_training(metadata)
    click.echo("  hyperparameters:")
    for line in json.dumps(metadata["model"], indent=2).splitlines()[1:-1]:
        click.echo(f"  {line}")


def _echo_training(metadata: dict) -> None:
    """Epochs, stored validation/test errors, data statistics and LLPR settings."""
    training = metadata.get("training") or {}
    if training.get("epochs_run") is not None:
        click.echo(
            f"  {'epochs':<14} {training['epochs_run']} run, best "
            f"{training.get('best_epoch')} ({training.get('training_time_s')} s)"
        )
    for name, value in (training.get("data") or {}).items():
        click.echo(f"  {name + ' data':<14} {value}")
    units = {"energy_per_atom": "meV/atom", "forces": "meV/Å", "stress": "meV/Å³"}
    for split in ("val", "test"):
        metrics = training.get(f"{split}_metrics") or {}
        parts = [
            f"{quantity} {1000 * metrics[f'{quantity}_rmse']:.3g} {unit}"
            for quantity, unit in units.items()
            if metrics.get(f"{quantity}_rmse") is not None
        ]
        if parts:
            structures = metrics.get("num_structures")
            click.echo(
                f"  {split + ' RMSE':<14} {', '.join(parts)}"
                + (f" ({structures} structures)" if structures else "")
            )
    stats = metadata.get("training_data_stats") or {}
    if stats:
        shown = ", ".join(
            f"{k} {v:.4g}" for k, v in stats.items() if isinstance(v, (int, float))
        )
        click.echo(f"  {'data stats':<14} {shown}")
    llpr = metadata.get("llpr") or {}
    if llpr:
        members = (llpr.get("num_ensemble_members") or {}).get("energy", 0)
        alpha = llpr.get("multiplier")
        alpha = f"{alpha:.4g}" if isinstance(alpha, (int, float)) else alpha
        click.echo(
            f"  {'LLPR':<14} {members} ensemble members, calibration "
            f"{llpr.get('calibration_method')}, α = {alpha}"
        )


@main.command("md")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument(
    "structure", type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("--index", default="0", show_default=True,
              help="Frame of STRUCTURE to start from (ASE index, e.g. -1).")
@click.option("--ensemble", type=click.Choice(["nve", "nvt", "npt"]), default="nve",
              show_default=True)
@click.option("--temperature", type=float, default=300.0, show_default=True,
              help="Initial velocities and thermostat target, K.")
@click.option("--steps", type=click.IntRange(min=0), default=1000, show_default=True)
@click.option("--timestep", type=float, default=1.0, show_default=True, help="fs.")
@click.option("--thermostat", type=click.Choice(["langevin", "bussi"]),
              default="langevin", show_default=True, help="NVT thermostat.")
@click.option("--friction", type=float, default=0.01, show_default=True,
              help="Langevin friction, 1/fs.")
@click.option("--tdamp", type=float, default=None,
              help="Thermostat time constant (bussi, npt), fs [100 timesteps].")
@click.option("--pdamp", type=float, default=None,
              help="Barostat time constant (npt), fs [1000 timesteps].")
@click.option("--pressure", type=float, default=0.0, show_default=True,
              help="External pressure for npt, GPa.")
@click.option("--trajectory", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write frames to this .traj or .xyz file.")
@click.option("--trajectory-interval", type=click.IntRange(min=1), default=10,
              show_default=True)
@click.option("--log", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write step, time, energies, T (and volume) to this file.")
@click.option("--log-interval", type=click.IntRange(min=1), default=10,
              show_default=True)
@click.option("--device", default=None, help="cpu or cuda [cuda when available].")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default=None,
              help="Float type to run in (default: the model's).")
@click.option("--seed", type=int, default=None, help="Seed of velocities and noise.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads [one per 4096 atoms, up to the cores].")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--max-uncertainty", type=click.FloatRange(min=0), default=None,
              help="LLPR models: act when the uncertainty measure exceeds this, in "
                   "its unit (eV/Å, eV or eV/atom).")
@click.option("--on-uncertain", type=click.Choice(["stop", "record"]), default=None,
              help="Over --max-uncertainty: end the run, or record the structure "
                   "and go on [stop].")
@click.option("--uncertainty-measure",
              type=click.Choice(["forces", "energy", "energy_per_atom"]), default=None,
              help="Max per-atom force σ (eV/Å), energy σ (eV) or energy σ per atom "
                   "(eV/atom) [forces].")
@click.option("--uncertainty-interval", type=click.IntRange(min=1), default=None,
              help="Check every K steps; each check computes the force ensemble, "
                   "a few MD steps' worth [1].")
@click.option("--uncertain-structures", type=click.Path(dir_okay=False, path_type=Path),
              default=None,
              help="Append structures over --max-uncertainty to this .xyz file "
                   "[with record: uncertain.xyz next to --trajectory, or here].")
@click.option("--uncertainty-log", type=click.Path(dir_okay=False, path_type=Path),
              default=None,
              help="Write step, time (fs), energy σ (eV) and max force σ (eV/Å) "
                   "at each check.")
def md_command(
    model: Path, structure: Path, index: str, ensemble: str, temperature: float,
    steps: int, timestep: float, thermostat: str, friction: float,
    tdamp: float | None, pdamp: float | None, pressure: float,
    trajectory: Path | None, trajectory_interval: int, log: Path | None,
    log_interval: int, device: str | None, dtype: str | None, seed: int | None,
    threads: int | None, quiet: bool, max_uncertainty: float | None,
    on_uncertain: str | None, uncertainty_measure: str | None,
    uncertainty_interval: int | None, uncertain_structures: Path | None,
    uncertainty_log: Path | None,
) -> None:
    """Run molecular dynamics with MODEL on STRUCTURE (any ASE-readable file).

    MODEL is a .safetensors model or a compiled .pt. Prints a summary at the end.
    With an LLPR model, any --*uncertain* option watches the uncertainty of the
    current structure (pes_calc.md.UncertaintyWatch) and reports the largest seen.
    """
    from pes_calc.calculator import PESCalculator
    from pes_calc.io import ModelFileError
    from pes_calc.md import UncertaintyWatch, run_md

    uncertainty_options = {
        "--max-uncertainty": max_uncertainty, "--on-uncertain": on_uncertain,
        "--uncertainty-measure": uncertainty_measure,
        "--uncertainty-interval": uncertainty_interval,
        "--uncertain-structures": uncertain_structures,
        "--uncertainty-log": uncertainty_log,
    }
    uncertainty_used = [name for name, value in uncertainty_options.items()
                        if value is not None]
    for name in ("--on-uncertain", "--uncertain-structures"):
        if name in uncertainty_used and max_uncertainty is None:
            raise click.UsageError(f"{name} needs --max-uncertainty")
    if on_uncertain == "record" and uncertain_structures is None:
        directory = trajectory.parent if trajectory is not None else Path()
        uncertain_structures = directory / "uncertain.xyz"
    for option, path in (("--trajectory", trajectory), ("--log", log),
                         ("--uncertain-structures", uncertain_structures),
                         ("--uncertainty-log", uncertainty_log)):
        check_output_path(path, option)
    atoms = _read_structure(structure, index)
    threads = threads or default_md_threads(len(atoms))
    _set_up_torch(device, threads)
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
                max_uncertainty, measure=uncertainty_measure or "forces",
                on_uncertain=on_uncertain or "stop", record_to=uncertain_structures,
                log=uncertainty_log, interval=uncertainty_interval or 1,
            )
        summary = run_md(
            atoms, calculator, ensemble=ensemble, temperature=temperature,
            steps=steps, timestep=timestep, thermostat=thermostat, friction=friction,
            tdamp=tdamp, pdamp=pdamp, pressure=pressure, trajectory=trajectory,
            trajectory_interval=trajectory_interval, log=log,
            log_interval=log_interval, progress=not quiet, seed=seed,
            observers=[watch] if watch is not None else [],
        )
    except (ModelFileError, ValueError, NotImplementedError) as error:
        raise click.ClickException(str(error)) from error
    finally:
        if watch is not None:
            watch.close()
    click.echo(str(summary))
    click.echo(f"  threads            {torch.get_num_threads()}")
    files = [("trajectory", trajectory), ("log", log),
             ("uncertainty log", uncertainty_log)]
    for name, path in files:
        if path is not None:
            click.echo(f"  {name:<18} {path}")
    if watch is not None and uncertain_structures is not None:
        click.echo(f"  {'uncertain':<18} {len(watch.recorded)} structures appended "
                   f"to {uncertain_structures}")


@main.command("train")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o", "--output", "outdir", type=click.Path(file_okay=False, path_type=Path),
    required=True, help="Run directory: model.safetensors, checkpoint.pt, train.csv.",
)
@click.option("--quiet", is_flag=True, help="No progress bar or per-epoch lines.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads [1: measured fastest on a busy machine].")
def train_command(config: Path, outdir: Path, quiet: bool, threads: int | None) -> None:
    """Train the model described by CONFIG (YAML); rerun to resume."""
    from pes_calc.io import ModelFileError
    from pes_calc.neighbors import UnknownSpeciesError
    from pes_calc.train import DatasetError, TrainingConfigError, load_config, train

    check_output_directory(outdir, "--output")
    # one thread unless asked: measured faster on a busy machine (README, Threads)
    torch.set_num_threads(threads or 1)
    if not quiet:
        click.echo(f"training with {torch.get_num_threads()} CPU thread(s)", err=True)
    try:
        result = train(load_config(config), outdir, progress=not quiet)
    except (TrainingConfigError, DatasetError, ModelFileError, UnknownSpeciesError,
            ValueError, FloatingPointError) as error:
        raise click.ClickException(str(error)) from error
    except KeyboardInterrupt:
        raise click.ClickException(
            f"interrupted; rerun the same command to resume from {outdir}/checkpoint.pt"
        ) from None
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one process reports
        click.echo(
            f"wrote {result.model_path} (best epoch {result.best_epoch}, "
            f"{result.training_time_s:.0f} s)"
        )


@main.command("active-learn")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o", "--output", "outdir", type=click.Path(file_okay=False, path_type=Path),
    required=True, help="Loop directory: round-NNN/ per round, report.csv, report.md.",
)
@click.option("--quiet", is_flag=True, help="No progress lines or bars.")
def active_learn_command(config: Path, outdir: Path, quiet: bool) -> None:
    """Uncertainty-triggered active learning described by CONFIG (YAML).

    Per round: train, wrap in LLPR, run MD, label the uncertain structures with
    the reference calculator, add them to the training set. Rerun to resume;
    raise budget.max_rounds in CONFIG to go on after the last round.
    """
    from pes_calc.active import format_table, load_config, run_active_learning
    from pes_calc.io import ModelFileError
    from pes_calc.neighbors import UnknownSpeciesError
    from pes_calc.train import DatasetError, TrainingConfigError

    check_output_directory(outdir, "--output")
    try:
        reports = run_active_learning(load_config(config), outdir, progress=not quiet)
    except (TrainingConfigError, DatasetError, ModelFileError, UnknownSpeciesError,
            ValueError, FloatingPointError) as error:
        raise click.ClickException(str(error)) from error
    except KeyboardInterrupt:
        raise click.ClickException(
            f"interrupted; rerun the same command to resume from {outdir} (labelled "
            "structures and finished stages are kept)"
        ) from None
    click.echo(format_table(reports))
    click.echo(f"stopped: {reports[-1].stop_reason} (tables in {outdir}/report.md, "
               "report.csv)")


@main.command("eval")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("data", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Write parity plots to this image file; for models with "
                   "uncertainties (LLPR) also a calibration plot next to it, "
                   "FILE-calibration.png for FILE.png.")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--energy-key", default="energy", show_default=True)
@click.option("--forces-key", default="forces", show_default=True)
@click.option("--stress-key", default="stress", show_default=True)
def eval_command(
    model: Path, data: Path, as_json: bool, plot: Path | None, batch_size: int,
    device: str, energy_key: str, forces_key: str, stress_key: str,
) -> None:
    """Errors of MODEL (.safetensors or compiled .pt) on the labelled DATA file.

    LLPR models are also scored on their uncertainties σ against the errors r of
    the structure energy (eV) and of each force component (eV/Å): mean σ, Gaussian
    NLL (nats, errors in eV), mean z² = r²/σ² (1 if calibrated) and the Spearman
    rank correlation of σ with |r|.
    """
    from pes_calc.artefacts import load_artefact
    from pes_calc.io import ModelFileError
    from pes_calc.neighbors import UnknownSpeciesError
    from pes_calc.train import (
        DatasetError,
        LabelKeys,
        load_graphs,
        measure_errors,
        parity_plot,
    )
    from pes_calc.train.evaluation import CALIBRATED, calibration_plot

    check_output_path(plot, "--plot")
    try:
        module, metadata = load_artefact(model, device)
        graphs = load_graphs(
            data, metadata["species"], metadata["cutoff"],
            LabelKeys(energy_key, forces_key, stress_key),
        )
        dtype = DTYPES[metadata["dtype"]]
        evaluation = measure_errors(module, graphs, batch_size=batch_size,
                                    device=device, dtype=dtype)
    except (ModelFileError, DatasetError, UnknownSpeciesError,
            NotImplementedError) as error:
        raise click.ClickException(str(error)) from error
    metrics = evaluation.metrics()
    calibration = None
    if plot is not None:
        parity_plot(evaluation, str(plot), title=f"{model.name} on {data.name}")
        if any(f"{name}_nll" in metrics for name in CALIBRATED):
            calibration = plot.with_name(f"{plot.stem}-calibration{plot.suffix}")
            calibration_plot(evaluation, str(calibration),
                             title=f"{model.name} on {data.name}")
    if as_json:
        # undefined figures (a Spearman over one structure) are NaN: JSON null
        click.echo(json.dumps({k: None if v != v else v for k, v in metrics.items()},
                              indent=2))
        return
    click.echo(f"{model} on {data} ({metrics['num_structures']} structures)")
    units = {"energy_per_atom": ("meV/atom", 1e3), "forces": ("meV/Å", 1e3),
             "stress": ("meV/Å³", 1e3)}
    for name, (unit, factor) in units.items():
        if f"{name}_rmse" in metrics:
            click.echo(
                f"  {name:<16} RMSE {factor * metrics[f'{name}_rmse']:10.3f}  "
                f"MAE {factor * metrics[f'{name}_mae']:10.3f}  {unit}"
            )
    for name, unit in (("energy", "meV"), ("forces", "meV/Å")):
        if f"{name}_nll" in metrics:
            sigma = 1e3 * metrics[f"{name}_uncertainty_mean"]
            click.echo(
                f"  {name + ' σ':<16} mean {sigma:10.3f} {unit:<7} "
                f"NLL {metrics[f'{name}_nll']:8.3f}  "
                f"z² {metrics[f'{name}_mean_squared_z']:7.3f}  "
                f"Spearman {metrics[f'{name}_spearman']:6.3f}"
            )
    if plot is not None:
        click.echo(f"  parity plot: {plot}")
    if calibration is not None:
        click.echo(f"  calibration plot: {calibration}")


@main.command("ipi")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--structure", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The system i-PI simulates (any ASE-readable file): species, atom "
                   "order and periodicity; i-PI sends only positions and cell.")
@click.option("--index", default="0", show_default=True,
              help="Frame of --structure to use (ASE index).")
@click.option("--address", metavar="HOST:PORT", default=None,
              help="i-PI's inet socket (<ffsocket mode='inet'>); port 31415 if "
                   "only HOST is given.")
@click.option("--unix", metavar="NAME", default=None,
              help="i-PI's unix socket <address>NAME</address>, the file "
                   "/tmp/ipi_NAME (a NAME with a / is the whole path).")
@click.option("--device", default=None, help="cpu or cuda [cuda when available].")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default=None,
              help="Float type to run in (default: the model's).")
@click.option("--skin", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="Verlet skin of the neighbour list, Å.")
@click.option("--wait", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Keep trying to connect for this many seconds while i-PI starts.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads.")
@click.option("--log-interval", type=click.IntRange(min=1), default=100,
              show_default=True, help="Report every N requests.")
@click.option("--quiet", is_flag=True, help="No progress on stderr.")
def ipi_command(
    model: Path, structure: Path, index: str, address: str | None, unix: str | None,
    device: str | None, dtype: str | None, skin: float, wait: float,
    threads: int | None, log_interval: int, quiet: bool,
) -> None:
    """Serve MODEL's energies, forces and virials to an i-PI server.

    Connects to i-PI at --address HOST:PORT or --unix NAME and computes each
    configuration i-PI sends (ASE's implementation of the i-PI socket protocol;
    atomic units on the wire) until i-PI sends EXIT or closes the connection.
    Start several clients to share the beads or replicas of a step. Progress
    (requests served, ms per request) goes to stderr.
    """
    import sys

    from pes_calc.io import ModelFileError
    from pes_calc.ipi import IPIError, parse_address, serve

    if (address is None) == (unix is None):
        raise click.UsageError("give one of --address HOST:PORT or --unix NAME")
    if address is not None:
        try:
            parse_address(address)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--address") from None
    _set_up_torch(device, threads)
    atoms = _read_structure(structure, index)
    try:
        serve(
            model, atoms, address=address, unix=unix, device=device,
            dtype=DTYPES[dtype] if dtype else None, skin=skin, wait=wait,
            log=None if quiet else sys.stderr, log_interval=log_interval,
        )
    except (IPIError, ModelFileError, ValueError, NotImplementedError) as error:
        raise click.ClickException(str(error)) from error


@main.command("lammps")
@click.argument("input_file", metavar="IN.lammps",
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("more_types", nargs=-1, metavar="")
@click.option("--model", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Model file: .safetensors, .pt (TorchScript) or .pt2 (AOTInductor).")
@click.option("--types", "first_type", required=True, metavar="A [B ...]",
              help="Element of each LAMMPS atom type, in type order, as pair_coeff "
                   "* * A B would name them.")
@click.option("--fix", default=None,
              help="ID of the input's `fix ID all external pf/callback 1 1` "
                   "[the first fix external].")
@click.option("--device", default=None, help="cpu, cuda or cuda:N [cpu].")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default=None,
              help="Float type to run in (default: the model's).")
@click.option("--skin", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="pes_calc's Verlet skin between LAMMPS re-neighbourings, Å.")
@click.option("--neighbor-skin", type=click.FloatRange(min=0), default=None,
              help="LAMMPS's neighbour skin, Å [the input's `neighbor` value, else 2].")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads per rank [cores / ranks on the node].")
@click.option("--max-uncertainty", type=click.FloatRange(min=0), default=None,
              help="LLPR models: stop the run when an atom's energy uncertainty "
                   "exceeds this, eV.")
@click.option("--record-to", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("runs/lammps-uncertain.xyz"), show_default=True,
              help="Where --max-uncertainty appends the structure that stopped "
                   "the run.")
@click.option("--log", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="LAMMPS log file [log.lammps].")
@click.option("--var", "variables", nargs=2, multiple=True, metavar="NAME VALUE",
              help="Set a LAMMPS index variable, as lmp -var NAME VALUE.")
@click.option("--quiet", is_flag=True, help="No LAMMPS output on the screen.")
def lammps_command(
    input_file: Path, more_types: tuple[str, ...], model: Path, first_type: str,
    fix: str | None, device: str | None, dtype: str | None, skin: float,
    neighbor_skin: float | None, threads: int | None, max_uncertainty: float | None,
    record_to: Path, log: Path | None, variables: tuple[tuple[str, str], ...],
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
    from pes_calc.lammps._library import LammpsUnavailableError

    try:
        from pes_calc.lammps.script import LammpsRunError, run_input
    except LammpsUnavailableError as error:
        raise click.ClickException(str(error)) from error
    _check_device(device)
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
            input_file, model, types, fix, device=device, dtype=dtype, skin=skin,
            neighbor_skin=neighbor_skin, max_uncertainty=max_uncertainty,
            record_to=record_to, threads=threads, lammps_args=lammps_args,
        )
    except (LammpsRunError, LammpsUnavailableError) as error:
        raise click.ClickException(str(error)) from error
    if summary["rank"] == 0:
        click.echo(
            f"pes-calc lammps: {summary['force_calls']} force calls on "
            f"{summary['ranks']} rank(s) x {summary['threads']} thread(s), "
            f"{1000 * summary['seconds_per_call']:.2f} ms per call (slowest rank), "
            f"{summary['neighbor_list_builds']} neighbour-list builds, ghost cutoff "
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


def _set_up_torch(device: str | None, threads: int | None) -> None:
    """Refuse --device cuda without a GPU; apply --threads."""
    _check_device(device)
    if threads is not None:
        torch.set_num_threads(threads)


def _check_device(device: str | None) -> None:
    if (device or "").startswith("cuda") and not torch.cuda.is_available():
        raise click.UsageError("--device cuda was asked for but no CUDA GPU is visible")


def _read_structure(structure: Path, index: str) -> ase.Atoms:
    """One frame of a structure file, or a click error saying why not."""
    import ase.io

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


if __name__ == "__main__":  # torchrun -m pes_calc.cli train ...
    main()
