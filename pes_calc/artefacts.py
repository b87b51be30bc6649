"""Loading and running any model file: ``.safetensors`` (eager), TorchScript ``.pt``
and AOTInductor ``.pt2`` (`load_artefact`), and their metadata.

Compiled archives carry the model's JSON metadata, a SHA-256 seal
(`pes_calc.archive`), and the names of the Python modules whose import registers the
custom operators the model calls and their autograd formulas (sphericart's
spherical-harmonics gradients are registered from Python: a model loaded without
them would silently lose force terms). `load_artefact` checks the archive, imports
those modules, then loads. A ``.pt2`` package also holds the eager model's weights:
the loaded package is checked against eager once and falls back to eager, with a
warning, when the compiled code does not load here or does not agree.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import tempfile
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# torch's own choice of vector instructions, and the CPU's flags (from cpuinfo)
from torch._inductor.cpu_vec_isa import pick_vec_isa, x86_isa_checker

from pes_calc import keys
from pes_calc.archive import check_archive
from pes_calc.compiled_graph import (
    COMPILED_OUTPUTS,
    PER_ATOM_OUTPUTS,
    example_graph,
    flat_inputs,
    long_range_module,
)
from pes_calc.graph import AtomicGraph, select_structures
from pes_calc.io import FORMAT_VERSION, ModelFileError, load_model, read_metadata

__all__ = [
    "AOTInductorPotential",
    "COMPILED_OUTPUTS",
    "METADATA_FILE",
    "REQUIRED_IMPORTS",
    "WEIGHTS_FILE",
    "example_graph",
    "compiled_cpu_features",
    "import_required",
    "load_artefact",
    "missing_cpu_features",
    "read_artefact_metadata",
    # defined in `pes_calc.compiled_graph`, still importable from here
    "PER_ATOM_OUTPUTS",
    "flat_inputs",
    "long_range_module",
]

METADATA_FILE = "pes_calc_metadata.json"
# the eager model inside a .pt2 package: the load-time check and the fallback
WEIGHTS_FILE = "pes_calc_model.safetensors"
# architecture → modules to import before running it (custom ops + their autograd)
REQUIRED_IMPORTS: dict[str, list[str]] = {
    "soap_bpnn": ["sphericart.torch"],
    "allegro": ["pes_calc.nn.gather"],
    "nequip": ["pes_calc.nn.tensor_product"],
}


class AOTInductorPotential(torch.nn.Module):
    """A loaded ``.pt2`` package, called like a `Potential`.

    Calls the compiled graph for energy, forces and stress (and LLPR energy
    uncertainties); what it was not compiled for (LLPR ensemble forces, graphs
    without edges, another dtype or device after ``.to()``) goes to the eager model
    it carries.
    """

    def __init__(
        self,
        compiled: Any,
        eager: Any,
        output_names: list[str],
        dtype: torch.dtype,
        device: str | torch.device,
        long_range: dict[str, Any] | None = None,
        neighbor_slots: bool = False,
    ):
        super().__init__()
        self.compiled = compiled
        self.long_range = long_range
        self.neighbor_slots = neighbor_slots
        self.eager = eager
        self.output_names = output_names
        self.ensemble_forces = False
        self.compiled_for = (dtype, torch.device(device).type)
        self._warned = False

    def forward(
        self,
        graph: AtomicGraph,
        compute_forces: bool = True,
        compute_stress: bool = True,
    ) -> dict[str, Tensor]:
        inputs = (graph.positions.dtype, graph.positions.device.type)
        if inputs != self.compiled_for and not self._warned:
            self._warned = True
            warnings.warn(
                f"this AOTInductor package was compiled for {self.compiled_for}, "
                f"not {inputs}: running its eager model instead",
                stacklevel=2,
            )
        if (
            self.ensemble_forces
            or graph.edge_index.shape[1] == 0
            or inputs != self.compiled_for
        ):
            if hasattr(self.eager, "ensemble_forces"):
                self.eager.ensemble_forces = self.ensemble_forces
            return self.eager(graph, compute_forces, compute_stress)
        if self.long_range is not None and self.long_range["method"] == "pme":
            outputs = self._per_periodic_structure(graph)
        else:
            outputs = self._compiled(graph)
        if not compute_forces:
            outputs.pop(keys.FORCES, None)
        if not compute_stress:
            outputs.pop(keys.STRESS, None)
        return outputs

    def _compiled(self, graph: AtomicGraph) -> dict[str, Tensor]:
        inputs = flat_inputs(graph, self.long_range, self.neighbor_slots)
        values = self.compiled(*inputs)
        return dict(zip(self.output_names, values, strict=True))

    def _per_periodic_structure(self, graph: AtomicGraph) -> dict[str, Tensor]:
        """A PME package sums one mesh (one periodic structure) per call: a batch
        with more runs one call per periodic structure (non-periodic structures go
        with the first) and is put back together."""
        periodic: list[bool] = graph.pbc.any(dim=1).tolist()
        groups = [[s] for s, p in enumerate(periodic) if p]
        if len(groups) <= 1:
            return self._compiled(graph)
        groups[0] = sorted(groups[0] + [s for s, p in enumerate(periodic) if not p])
        num_atoms, num_structures = graph.positions.shape[0], len(periodic)
        outputs: dict[str, Tensor] = {}
        for group in groups:
            chosen = torch.zeros(num_structures, dtype=torch.bool)
            chosen[group] = True
            chosen = chosen.to(graph.cell.device)
            atoms = chosen[graph.structure_index]
            for name, value in self._compiled(select_structures(graph, group)).items():
                rows = atoms if name in PER_ATOM_OUTPUTS else chosen
                if name not in outputs:
                    size = num_atoms if name in PER_ATOM_OUTPUTS else num_structures
                    outputs[name] = value.new_zeros((size, *value.shape[1:]))
                outputs[name][rows] = value
        return outputs


def _load_aotinductor(
    path: Path, metadata: dict[str, Any], device: str | torch.device
) -> torch.nn.Module:
    """The compiled package, or its eager model (with a warning) when the compiled
    code cannot run here or disagrees with eager on the example graph."""
    with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory() as scratch:
        names = [n for n in archive.namelist() if n.endswith(f"/{WEIGHTS_FILE}")]
        if not names:
            raise ModelFileError(f"{path} holds no pes_calc weights (not pes_calc's?)")
        weights = Path(scratch) / WEIGHTS_FILE
        weights.write_bytes(archive.read(names[0]))
        eager = load_model(weights)
    dtype = getattr(torch, metadata["dtype"])
    eager = eager.to(device=device, dtype=dtype).eval()
    if torch.device(device).type != torch.device(metadata["device"]).type:
        warnings.warn(
            f"{path} was compiled for {metadata['device']}, not {device}: running "
            "its eager model instead (recompile with pes-calc compile --device)",
            stacklevel=3,
        )
        return eager
    missing = missing_cpu_features(metadata)
    if missing:
        # compiled loops with instructions this CPU lacks would not raise: they
        # would kill the process (SIGILL), so they must never run
        warnings.warn(
            f"{path} was compiled for CPU features this machine lacks "
            f"({', '.join(missing)}): running its eager model instead (recompile "
            "here with pes-calc compile for the compiled speed)",
            stacklevel=3,
        )
        return eager
    try:
        compiled = torch._inductor.aoti_load_package(str(path))
        loaded = AOTInductorPotential(
            compiled,
            eager,
            metadata["compiled_outputs"],
            dtype,
            device,
            metadata.get("long_range_inputs"),
            metadata.get("neighbor_slots", False),
        )
        _check_against_eager(loaded, eager, dtype, device)
    except Exception as error:  # any failure of compiled code: eager still works
        warnings.warn(
            f"{path}: the AOTInductor code cannot be used here ({error}); running "
            "its eager model instead",
            stacklevel=3,
        )
        return eager
    threads = metadata.get("cpu_threads")
    if threads is not None and threads != torch.get_num_threads():
        warnings.warn(
            f"{path} was compiled for {threads} CPU thread(s) and runs with "
            f"{torch.get_num_threads()}: slower than it could be (1.7x for SOAP-BPNN "
            f"in the README); recompile with pes-calc compile --threads "
            f"{torch.get_num_threads()}",
            stacklevel=3,
        )
    return loaded


def compiled_cpu_features() -> dict[str, Any]:
    """The CPU this machine's inductor compiles for: its architecture and the
    vector-instruction flags the generated loops may use (x86: e.g. avx2 fma)."""
    isa = pick_vec_isa()
    return {"machine": platform.machine(), "flags": str(isa).split() if isa else []}


def missing_cpu_features(metadata: dict[str, Any]) -> list[str]:
    """What a package's compiled CPU code needs that this machine lacks: another
    architecture, or x86 flags absent here (empty when nothing is recorded)."""
    recorded = metadata.get("cpu_features")
    if not recorded or torch.device(metadata.get("device", "cpu")).type != "cpu":
        return []
    if recorded["machine"] != platform.machine():
        return [f"a {recorded['machine']} CPU, not {platform.machine()}"]
    if platform.machine() not in ("x86_64", "AMD64"):
        return []  # the library would not load on another ISA: the fallback catches it
    available = set(x86_isa_checker())
    return [flag for flag in recorded["flags"] if flag not in available]


def _check_against_eager(
    loaded: AOTInductorPotential,
    eager: Any,
    dtype: torch.dtype,
    device: str | torch.device,
) -> None:
    """Raise if compiled and eager disagree on the example graph."""
    if hasattr(eager, "ensemble_forces"):
        eager.ensemble_forces = False
    graph = example_graph(eager, dtype, device)
    expected = {k: v.detach() for k, v in eager(graph, True, True).items()}
    got = loaded(graph, True, True)
    # float32 sums over a few dozen atoms: a few ulps of the largest value
    rtol = 1e-4 if dtype == torch.float32 else 1e-9
    for name in loaded.output_names:
        scale = 1.0 + float(expected[name].abs().max())
        error = float((got[name] - expected[name]).abs().max())
        if not error <= rtol * scale:
            raise RuntimeError(
                f"compiled {name} differs from eager by {error:.3g} (tolerance "
                f"{rtol * scale:.3g})"
            )


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
    """The metadata stored in a compiled artefact (``.pt`` or ``.pt2``), checked."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"no model file at {path}")
    try:
        is_zip = zipfile.is_zipfile(path)
    except Exception:  # a damaged end record can make the test itself raise
        is_zip = False
    if not is_zip:
        raise ModelFileError(
            f"{path} is not a TorchScript or AOTInductor archive "
            "(corrupted or truncated?)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            names = [
                n for n in archive.namelist() if n.endswith(f"extra/{METADATA_FILE}")
            ]
            metadata = json.loads(archive.read(names[0])) if names else None
    except Exception as error:  # a damaged header or member shows in several ways
        raise ModelFileError(f"{path}: the archive is damaged: {error}") from error
    if metadata is None:
        raise ModelFileError(
            f"{path} is a zip archive but not one written by "
            "`pes-calc compile` (no pes_calc metadata inside)"
        )
    if not isinstance(metadata, dict):
        raise ModelFileError(f"{path}: its pes_calc metadata is not a JSON object")
    try:
        format_version = int(metadata.get("format_version", -1))
    except (TypeError, ValueError) as error:
        raise ModelFileError(f"{path}: its format_version is unreadable") from error
    if format_version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} was compiled with a newer model format "
            f"({metadata['format_version']}); upgrade pes_calc to read it"
        )
    return metadata


def load_artefact(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load any model file: ``.safetensors`` (eager), TorchScript ``.pt`` or
    AOTInductor ``.pt2``.

    Returns the callable model and its metadata.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_model(path).to(device), read_metadata(path)
    metadata = read_artefact_metadata(path)
    check_archive(path, sealed=bool(metadata.get("sealed")))
    import_required(metadata.get("required_imports", []))
    if metadata.get("artefact") == "aotinductor":
        return _load_aotinductor(path, metadata, device), metadata
    try:
        module = torch.jit.load(str(path), map_location=device)
    except Exception as error:  # the checks above leave only foreign content
        raise ModelFileError(
            f"{path}: TorchScript could not load it: {error}"
        ) from error
    return module.eval(), metadata
