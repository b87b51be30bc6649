"""``pes-calc compile`` and ``pes-calc info``: make and inspect model files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click
from safetensors import safe_open

from pes_calc.artefacts import read_artefact_metadata
from pes_calc.choices import DTYPES
from pes_calc.cli.common import (
    check_output_path,
    dtype_option,
    model_argument,
    set_up_torch,
    user_errors,
)
from pes_calc.compile import MODIFIERS, compile_model, mode_for
from pes_calc.io import is_checked, load_model, read_metadata


@click.command("compile")
@model_argument
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the compiled model: .pt2 is an AOTInductor package, .pt "
    "TorchScript (default: MODEL's name with the mode's suffix, .pt2 without one).",
)
@click.option(
    "--mode",
    type=click.Choice(["aotinductor", "torchscript"]),
    default=None,
    help="Kind of artefact (default: the one the output's suffix names; "
    "aotinductor when no output is given).",
)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@dtype_option("Float type of the artefact (default: the model's).")
@click.option(
    "--modifiers",
    multiple=True,
    type=click.Choice(sorted(MODIFIERS)),
    help="Model modifiers to apply before compiling (repeatable).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads the AOTInductor package will run with (pes-calc md --threads); "
    "its loops are generated for that many (default: torch's, all cores).",
)
@user_errors()
def compile_command(
    model: Path,
    output: Path,
    mode: str,
    device: str,
    dtype: str | None,
    modifiers: tuple[str, ...],
    threads: int | None,
) -> None:
    """Compile MODEL (.safetensors) into a self-describing artefact.

    AOTInductor packages take minutes to compile and are cached by weights, torch
    version, device, dtype, CPU threads and pes_calc's source in $PES_CALC_CACHE_DIR
    (default ~/.cache/pes_calc).
    """
    if output is None:
        output = model.with_suffix(".pt" if mode == "torchscript" else ".pt2")
    mode = mode_for(output, mode)
    check_output_path(output, "--output")
    set_up_torch(device, threads)
    compile_model(
        load_model(model),
        output,
        mode=mode,
        device=device,
        dtype=DTYPES[dtype] if dtype else None,
        modifiers=modifiers,
    )
    click.echo(f"wrote {output} ({mode}, {device}, {dtype or 'model dtype'})")


@click.command("info")
@model_argument
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
@user_errors()
def info_command(model: Path, as_json: bool) -> None:
    """Show what MODEL (.safetensors or compiled .pt) holds."""
    if model.suffix == ".safetensors":
        metadata = read_metadata(model)
        metadata["artefact"] = "safetensors"
        metadata["integrity"] = (
            "SHA-256 of the metadata and of every tensor, checked at load"
            if is_checked(model)
            else "unchecked: written before pes_calc stored digests"
        )
        with safe_open(str(model), framework="pt") as handle:
            # a safe_open handle is not iterable: list its tensors with keys()
            names = handle.keys()
            metadata["num_parameters"] = sum(
                math.prod(handle.get_slice(name).get_shape()) for name in names
            )
    else:
        metadata = read_artefact_metadata(model)
        metadata["integrity"] = (
            "SHA-256 of the whole archive, checked at load"
            if metadata.get("sealed")
            else "zip CRC-32 of every member, checked at load (unsealed)"
        )
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
        click.echo(
            f"  {'LLPR':<14} {members} ensemble members, calibration "
            f"{llpr.get('calibration_method')}"
        )
        click.echo(f"  {'energy σ':<14} {_energy_sigma(llpr)}")
        scores = llpr.get("energy_validation_nll") or {}
        if scores:
            shown = ", ".join(f"{name} {_number(v)}" for name, v in scores.items())
            click.echo(f"  {'energy σ NLL':<14} {shown} (validation; the lower wins)")
        forces = llpr.get("forces_multiplier")
        # files from before per-property calibration: forces use the energy α
        force_alpha = (
            f"α = {_number(forces)} (β = {_number(llpr.get('force_scale'))})"
            if forces is not None
            else "the energy α"
        )
        click.echo(
            f"  {'forces σ':<14} "
            + (force_alpha if members else "none (no ensemble members)")
        )


def _energy_sigma(llpr: dict) -> str:
    """The energy σ's source and factors, √((w α ‖L⁻¹g‖)² + a² spread²), as the
    file's settings record them: files from before the choice are analytic, with
    (w, a) = (1, 0); the ensemble source has w = 0."""
    source = llpr.get("energy_uncertainty") or "analytic"
    weight = 0.0 if source == "ensemble" else 1.0
    scale = llpr.get("energy_ensemble_multiplier", 0.0)
    description = {
        "analytic": "α ‖L⁻¹g‖",
        "ensemble": "a × the members' spread",
    }.get(source, "")
    return (
        source
        + (f" ({description})" if description else "")
        + f": α = {_number(llpr.get('multiplier'))}, w = {_number(weight)}, "
        f"a = {_number(scale)}"
    )


def _number(value: object) -> str:
    """A stored figure to 4 significant digits (anything else as it is)."""
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)
