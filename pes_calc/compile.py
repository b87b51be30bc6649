"""Compiled artefacts: TorchScript ``.pt`` files that carry their own metadata.

``compile_model`` scripts a `Potential` (forces and stress are computed inside the
compiled graph) and stores the model's JSON metadata in the archive, together with
the Python modules whose import registers the custom operators it calls and their
autograd formulas: sphericart's spherical-harmonics gradients are registered from
Python, and a model loaded without them would silently lose force terms.
`load_artefact` imports those modules before it loads anything.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pes_calc.io import FORMAT_TAG, FORMAT_VERSION, ModelFileError, model_metadata
from pes_calc.potential import Potential

METADATA_FILE = "pes_calc_metadata.json"

# architecture → modules to import before running it (custom ops + their autograd)
REQUIRED_IMPORTS: dict[str, list[str]] = {"soap_bpnn": ["sphericart.torch"]}


def enable_ForceStressOutput(model: Potential) -> Potential:  # noqa: N802 (nequip's name)
    """Compute forces and stress in an energy-only (``do_derivatives: false``) model."""
    model.do_derivatives = True
    return model


MODIFIERS: dict[str, Callable[[Potential], Potential]] = {
    "enable_ForceStressOutput": enable_ForceStressOutput,
}


def apply_modifiers(model: Potential, modifiers: Sequence[str]) -> Potential:
    """Apply named model modifiers in order; unknown names raise ``ValueError``."""
    for name in modifiers:
        if name not in MODIFIERS:
            raise ValueError(
                f"unknown modifier {name!r}; available: {', '.join(sorted(MODIFIERS))}"
            )
        model = MODIFIERS[name](model)
    return model


def compile_model(
    model: Potential,
    path: str | os.PathLike,
    *,
    mode: str = "torchscript",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    modifiers: Sequence[str] = (),
) -> None:
    """Write ``model`` as a compiled artefact at ``path``.

    Parameters
    ----------
    mode
        ``"torchscript"`` (a ``.pt`` file).
    device, dtype
        Where and in which float type the artefact runs (dtype: the model's).
    modifiers
        Names from `MODIFIERS`, e.g. ``["enable_ForceStressOutput"]``.
    """
    if mode != "torchscript":
        raise NotImplementedError(
            f"compile mode {mode!r} is not available yet; use 'torchscript'"
        )
    # modifiers, .to() and .eval() act in place: work on a copy of the caller's model
    model = apply_modifiers(copy.deepcopy(model), modifiers)
    if dtype is not None:
        model = model.to(dtype)
    model = model.to(device).eval()
    metadata = model_metadata(model)
    metadata.update(
        format=FORMAT_TAG,
        format_version=FORMAT_VERSION,
        artefact="torchscript",
        device=str(device),
        modifiers=list(modifiers),
        required_imports=REQUIRED_IMPORTS.get(metadata["architecture"], []),
        torch_version=torch.__version__,
    )
    # e3nn's script recursively traces the submodules it marks "trace" (its gate
    # activations) and scripts the rest; plain torch.jit.script cannot do those
    from e3nn.util.jit import script

    scripted = script(model, in_place=True)
    torch.jit.save(scripted, str(path), _extra_files={METADATA_FILE: json.dumps(metadata)})


def import_required(modules: Sequence[str]) -> None:
    """Import the modules an artefact needs (custom operators and their autograd)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ImportError(
                f"this model needs the Python module {name!r} to compute correct "
                f"forces; install it (pip install {name.split('.')[0]})"
            ) from error


def read_artefact_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata stored in a TorchScript artefact, checked."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"no model file at {path}")
    if not zipfile.is_zipfile(path):
        raise ModelFileError(
            f"{path} is not a TorchScript archive (corrupted or truncated?)"
        )
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith(f"extra/{METADATA_FILE}")]
        if not names:
            raise ModelFileError(
                f"{path} is a TorchScript file but not one written by "
                "`pes-calc compile` (no pes_calc metadata inside)"
            )
        metadata = json.loads(archive.read(names[0]))
    if int(metadata.get("format_version", -1)) > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} was compiled with a newer model format "
            f"({metadata['format_version']}); upgrade pes_calc to read it"
        )
    return metadata


def load_artefact(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load any model file: ``.safetensors`` (eager) or TorchScript ``.pt``.

    Returns the callable model and its metadata.
    """
    from pes_calc.io import load_model, read_metadata

    path = Path(path)
    if path.suffix == ".safetensors":
        return load_model(path).to(device), read_metadata(path)
    if path.suffix == ".pt2":
        raise NotImplementedError("AOTInductor .pt2 artefacts are not supported yet")
    metadata = read_artefact_metadata(path)
    import_required(metadata.get("required_imports", []))
    try:
        module = torch.jit.load(str(path), map_location=device)
    except RuntimeError as error:
        raise ModelFileError(f"{path}: TorchScript could not load it: {error}") from error
    return module.eval(), metadata
