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

import ase
import numpy as np
import torch
from torch import Tensor

# torch's own choice of vector instructions, and the CPU's flags (from cpuinfo)
from torch._inductor.cpu_vec_isa import pick_vec_isa, x86_isa_checker

from pes_calc import keys
from pes_calc.archive import check_archive
from pes_calc.graph import AtomicGraph, batch_graphs, graph_to, select_structures
from pes_calc.io import FORMAT_VERSION, ModelFileError, load_model, read_metadata
from pes_calc.neighbors import atoms_to_graph
from pes_calc.nn.long_range import (
    LongRangeElectrostatics,
    export_input_names,
    export_inputs,
)

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
]

METADATA_FILE = "pes_calc_metadata.json"
# the eager model inside a .pt2 package: the load-time check and the fallback
WEIGHTS_FILE = "pes_calc_model.safetensors"
# outputs a compiled graph returns, in this order (those the model has)
COMPILED_OUTPUTS = (
    keys.ENERGY,
    keys.ENERGIES,
    keys.FORCES,
    keys.STRESS,
    keys.ENERGY_UNCERTAINTY,
    keys.ENERGIES_UNCERTAINTY,
    keys.ENERGY_ENSEMBLE,
)
# compiled outputs with one row per atom (the others: one per structure)
PER_ATOM_OUTPUTS = (keys.ENERGIES, keys.FORCES, keys.ENERGIES_UNCERTAINTY)
# architecture → modules to import before running it (custom ops + their autograd)
REQUIRED_IMPORTS: dict[str, list[str]] = {
    "soap_bpnn": ["sphericart.torch"],
    "allegro": ["pes_calc.nn.gather"],
    "nequip": ["pes_calc.nn.tensor_product"],
}


def flat_inputs(
    graph: AtomicGraph, long_range: dict[str, Any] | None = None
) -> tuple[Tensor, ...]:
    """The graph's tensors in the order a compiled graph takes them; with
    ``long_range`` (a package's ``long_range_inputs`` metadata) also the
    cell-dependent data of its Ewald or PME sum: k-vector indices, the PME mesh
    shape, pairs (`pes_calc.nn.long_range.export_inputs`)."""
    tensors = (
        graph.positions,
        graph.cell,
        graph.pbc,
        graph.species,
        graph.edge_index,
        graph.edge_cell_shifts,
        graph.structure_index,
    )
    if long_range is None:
        return tensors
    extra = export_inputs(graph, long_range)
    return tensors + tuple(extra[name] for name in export_input_names(long_range))


def long_range_module(model: Any) -> LongRangeElectrostatics | None:
    """The model's long-range electrostatics, if it has one."""
    for module in model.modules():
        if isinstance(module, LongRangeElectrostatics):
            return module
    return None


def example_graph(
    model: Any, dtype: torch.dtype, device: str | torch.device
) -> AtomicGraph:
    """Two small periodic structures holding every species, with edges.

    The tracing and the load-time check run on it. Two structures of more than
    one atom each, because export specialises sizes 0 and 1 to constants. A
    long-range model also gets a non-periodic cluster (its direct sum) and a slab
    (the 2D correction), so that every sum is traced and checked.
    """
    cutoff = float(model.cutoff)
    generator = np.random.default_rng(0)
    structures = []
    for repeats in (2, 3):
        # a jittered simple-cubic lattice at half the cutoff: every atom has neighbors
        spacing = 0.5 * cutoff
        grid = np.stack(np.meshgrid(*[np.arange(repeats)] * 3), -1).reshape(-1, 3)
        positions = spacing * (grid + 0.1 * generator.standard_normal(grid.shape))
        symbols = [model.species[k % len(model.species)] for k in range(len(grid))]
        atoms = ase.Atoms(
            symbols, positions=positions, cell=np.eye(3) * spacing * repeats, pbc=True
        )
        structures.append(atoms_to_graph(atoms, model.species, cutoff, dtype=dtype))
    if long_range_module(model) is not None:
        spacing = 0.45 * cutoff
        cluster = [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0.5]]
        slab = [[0, 0, 0], [1, 0, 0.2], [0, 1, 0.4], [1, 1, 0.1], [0.5, 0.5, 1]]
        for points, pbc in ((cluster, False), (slab, (True, True, False))):
            positions = spacing * (
                np.array(points) + 0.1 * generator.standard_normal((5, 3))
            )
            symbols = [model.species[k % len(model.species)] for k in range(5)]
            # the slab: 2 × 2 spacings in plane, 2 spacings of vacuum above it
            cell = np.diag([2.0, 2.0, 4.0]) * spacing if pbc else None
            atoms = ase.Atoms(symbols, positions=positions, cell=cell, pbc=pbc)
            structures.append(atoms_to_graph(atoms, model.species, cutoff, dtype=dtype))
    return graph_to(batch_graphs(structures), torch.device(device), dtype)


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
    ):
        super().__init__()
        self.compiled = compiled
        self.long_range = long_range
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
        values = self.compiled(*flat_inputs(graph, self.long_range))
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
