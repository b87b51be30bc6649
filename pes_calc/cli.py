"""The ``pes-calc`` command line: compile and inspect models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click
import torch

from pes_calc.compile import MODIFIERS

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pes_calc")
def main() -> None:
    """pes-calc: compile, inspect and run machine-learned interatomic potentials."""


@main.command("compile")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
    help="Where to write the compiled model (.pt for TorchScript).",
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
def compile_command(
    model: Path, output: Path, mode: str, device: str, dtype: str | None,
    modifiers: tuple[str, ...],
) -> None:
    """Compile MODEL (.safetensors) into a self-describing artefact."""
    from pes_calc.compile import compile_model
    from pes_calc.io import ModelFileError, load_model

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.UsageError("--device cuda was asked for but no CUDA GPU is visible")
    try:
        eager = load_model(model)
        compile_model(
            eager, output, mode=mode, device=device,
            dtype=DTYPES[dtype] if dtype else None, modifiers=modifiers,
        )
    except (ModelFileError, NotImplementedError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"wrote {output} ({mode}, {device}, {dtype or 'model dtype'})")


@main.command("info")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
def info_command(model: Path, as_json: bool) -> None:
    """Show what MODEL (.safetensors or compiled .pt) holds."""
    from pes_calc.compile import read_artefact_metadata
    from pes_calc.io import ModelFileError, read_metadata

    try:
        if model.suffix == ".safetensors":
            metadata = read_metadata(model)
            metadata["artefact"] = "safetensors"
            from safetensors import safe_open

            with safe_open(str(model), framework="pt") as handle:
                metadata["num_parameters"] = sum(
                    math.prod(handle.get_slice(name).get_shape())
                    for name in handle.keys()
                )
        else:
            metadata = read_artefact_metadata(model)
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
    ]
    for name, value in rows:
        if value is not None:
            click.echo(f"  {name:<14} {value}")
    click.echo("  hyperparameters:")
    for line in json.dumps(metadata["model"], indent=2).splitlines()[1:-1]:
        click.echo(f"  {line}")
