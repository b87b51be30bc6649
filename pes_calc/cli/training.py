"""``pes-calc train``, ``pes-calc active-learn`` and ``pes-calc eval``: fit models,
run the active-learning loop, score a model on labelled data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import torch

from pes_calc.active import format_table, run_active_learning
from pes_calc.active import load_config as load_active_config
from pes_calc.artefacts import load_artefact
from pes_calc.choices import DTYPES
from pes_calc.cli.common import (
    check_output_directory,
    check_output_path,
    model_argument,
    user_errors,
)
from pes_calc.train import LabelKeys, load_graphs, measure_errors, parity_plot, train
from pes_calc.train import load_config as load_training_config
from pes_calc.train.evaluation import CALIBRATED, calibration_plot


@click.command("train")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    "outdir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Run directory: model.safetensors, checkpoint.pt, train.csv.",
)
@click.option("--quiet", is_flag=True, help="No progress bar or per-epoch lines.")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="torch CPU threads [1: measured fastest on a busy machine].",
)
@user_errors()
def train_command(config: Path, outdir: Path, quiet: bool, threads: int | None) -> None:
    """Train the model described by CONFIG (YAML); rerun to resume."""
    check_output_directory(outdir, "--output")
    # one thread unless asked: measured faster on a busy machine (README, Threads)
    torch.set_num_threads(threads or 1)
    if not quiet:
        click.echo(f"training with {torch.get_num_threads()} CPU thread(s)", err=True)
    try:
        result = train(load_training_config(config), outdir, progress=not quiet)
    except KeyboardInterrupt:
        raise click.ClickException(
            f"interrupted; rerun the same command to resume from {outdir}/checkpoint.pt"
        ) from None
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one process reports
        click.echo(
            f"wrote {result.model_path} (best epoch {result.best_epoch}, "
            f"{result.training_time_s:.0f} s)"
        )


@click.command("active-learn")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    "outdir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Loop directory: round-NNN/ per round, report.csv, report.md.",
)
@click.option("--quiet", is_flag=True, help="No progress lines or bars.")
@user_errors()
def active_learn_command(config: Path, outdir: Path, quiet: bool) -> None:
    """Uncertainty-triggered active learning described by CONFIG (YAML).

    Per round: train, wrap in LLPR, run MD, label the uncertain structures with
    the reference calculator, add them to the training set. Rerun to resume;
    raise budget.max_rounds in CONFIG to go on after the last round.
    """
    check_output_directory(outdir, "--output")
    try:
        reports = run_active_learning(
            load_active_config(config), outdir, progress=not quiet
        )
    except KeyboardInterrupt:
        raise click.ClickException(
            f"interrupted; rerun the same command to resume from {outdir} (labelled "
            "structures and finished stages are kept)"
        ) from None
    click.echo(format_table(reports))
    click.echo(
        f"stopped: {reports[-1].stop_reason} (tables in {outdir}/report.md, report.csv)"
    )


@click.command("eval")
@model_argument
@click.argument("data", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write parity plots to this image file; for models with "
    "uncertainties (LLPR) also a calibration plot next to it, "
    "FILE-calibration.png for FILE.png.",
)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--energy-key", default="energy", show_default=True)
@click.option("--forces-key", default="forces", show_default=True)
@click.option("--stress-key", default="stress", show_default=True)
@user_errors()
def eval_command(
    model: Path,
    data: Path,
    as_json: bool,
    plot: Path | None,
    batch_size: int,
    device: str,
    energy_key: str,
    forces_key: str,
    stress_key: str,
) -> None:
    """Errors of MODEL (.safetensors or compiled .pt) on the labelled DATA file.

    LLPR models are also scored on their uncertainties σ against the errors r of
    the structure energy (eV) and of each force component (eV/Å): mean σ, Gaussian
    NLL (nats, errors in eV), mean z² = r²/σ² (1 if calibrated) and the Spearman
    rank correlation of σ with |r|.
    """
    check_output_path(plot, "--plot")
    module, metadata = load_artefact(model, device)
    graphs = load_graphs(
        data,
        metadata["species"],
        metadata["cutoff"],
        LabelKeys(energy_key, forces_key, stress_key),
    )
    dtype = DTYPES[metadata["dtype"]]
    evaluation = measure_errors(
        module, graphs, batch_size=batch_size, device=device, dtype=dtype
    )
    metrics = evaluation.metrics()
    calibration = None
    if plot is not None:
        parity_plot(evaluation, str(plot), title=f"{model.name} on {data.name}")
        if any(f"{name}_nll" in metrics for name in CALIBRATED):
            calibration = plot.with_name(f"{plot.stem}-calibration{plot.suffix}")
            calibration_plot(
                evaluation, str(calibration), title=f"{model.name} on {data.name}"
            )
    if as_json:
        # undefined figures (a Spearman over one structure) are NaN: JSON null
        click.echo(
            json.dumps({k: None if v != v else v for k, v in metrics.items()}, indent=2)
        )
        return
    click.echo(f"{model} on {data} ({metrics['num_structures']} structures)")
    units = {
        "energy_per_atom": ("meV/atom", 1e3),
        "forces": ("meV/Å", 1e3),
        "stress": ("meV/Å³", 1e3),
    }
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
