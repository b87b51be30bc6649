"""Compiled artefacts that carry their own metadata: TorchScript ``.pt`` files and
AOTInductor ``.pt2`` packages.

``compile_model`` turns a `Potential` (or an `LLPR` around one) into either; forces
and stress are computed inside the compiled graph. Both archives hold the model's
JSON metadata and the Python modules whose import registers the custom operators it
calls and their autograd formulas: sphericart's spherical-harmonics gradients are
registered from Python, and a model loaded without them would silently lose force
terms. `load_artefact` imports those modules before it loads anything.

AOTInductor: the energy and its backward pass are traced together into one graph
(``make_fx``; ``torch.export`` cannot trace ``autograd.grad`` itself), exported with
dynamic numbers of atoms, edges and structures, and compiled to a shared library in
a ``.pt2`` package. The package also holds the eager model's weights, so a loaded
artefact is checked against eager once and falls back to eager, with a warning, when
the compiled code does not load or does not agree. Compiling takes minutes, so
packages are cached by (weights, torch version, device, dtype, CPU threads,
pes_calc's source) in ``$PES_CALC_CACHE_DIR`` (default ``~/.cache/pes_calc``).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import os
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pes_calc import keys
from pes_calc.archive import check_archive, seal
from pes_calc.choices import as_device, as_dtype
from pes_calc.graph import AtomicGraph
from pes_calc.io import (
    FORMAT_TAG,
    FORMAT_VERSION,
    ModelFileError,
    model_metadata,
    model_state,
)
from pes_calc.potential import Potential

METADATA_FILE = "pes_calc_metadata.json"
# the eager model inside a .pt2 package: the load-time check and the fallback
WEIGHTS_FILE = "pes_calc_model.safetensors"
MODES = ("torchscript", "aotinductor")
# outputs a compiled graph returns, in this order (those the model has)
COMPILED_OUTPUTS = (
    keys.ENERGY, keys.ENERGIES, keys.FORCES, keys.STRESS,
    keys.ENERGY_UNCERTAINTY, keys.ENERGIES_UNCERTAINTY, keys.ENERGY_ENSEMBLE,
)

# architecture → modules to import before running it (custom ops + their autograd)
REQUIRED_IMPORTS: dict[str, list[str]] = {
    "soap_bpnn": ["sphericart.torch"],
    "allegro": ["pes_calc.nn.gather"],
    "nequip": ["pes_calc.nn.tensor_product"],
}


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
    dtype: torch.dtype | str | None = None,
    modifiers: Sequence[str] = (),
) -> None:
    """Write ``model`` as a compiled artefact at ``path``.

    Parameters
    ----------
    mode
        ``"torchscript"`` (a ``.pt`` file) or ``"aotinductor"`` (a ``.pt2``
        package; minutes to compile, cached).
    device, dtype
        Where and in which float type the artefact runs (dtype: the model's).
    modifiers
        Names from `MODIFIERS`, e.g. ``["enable_ForceStressOutput"]``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose from {MODES}")
    dtype = as_dtype(dtype)
    device = as_device(device) or torch.device("cpu")
    # modifiers, .to() and .eval() act in place: work on a copy of the caller's model
    model = apply_modifiers(copy.deepcopy(model), modifiers)
    if dtype is not None:
        model = model.to(dtype)
    model = model.to(device).eval()
    metadata = model_metadata(model)
    metadata.update(
        format=FORMAT_TAG,
        format_version=FORMAT_VERSION,
        artefact=mode,
        device=str(device),
        modifiers=list(modifiers),
        required_imports=REQUIRED_IMPORTS.get(metadata["architecture"], []),
        torch_version=torch.__version__,
        sealed=True,  # `seal` appends the archive's SHA-256 once it is written
    )
    if mode == "aotinductor":
        if metadata["model"].get("long_range", {}).get("enable"):
            # k-vectors and PME mesh sizes depend on the cell's values: export
            # stops at these data-dependent shapes
            raise NotImplementedError(
                "AOTInductor cannot compile long-range (Ewald/PME) models yet; "
                "use --mode torchscript"
            )
        _compile_aotinductor(model, Path(path), metadata)
        return
    # e3nn's script recursively traces the submodules it marks "trace" (its gate
    # activations) and scripts the rest; plain torch.jit.script cannot do those
    from e3nn.util.jit import script

    scripted = script(model, in_place=True)
    torch.jit.save(scripted, str(path), _extra_files={METADATA_FILE: json.dumps(metadata)})
    seal(path)


# ---- AOTInductor -------------------------------------------------------------------


class _FlatInputs(torch.nn.Module):
    """The model called on the graph's tensors, returning a tuple: the calling
    convention of an exported program. Properties (no labels) stay empty."""

    def __init__(self, model: torch.nn.Module, output_names: Sequence[str]):
        super().__init__()
        self.model = model
        self.output_names = list(output_names)

    def forward(
        self, positions: Tensor, cell: Tensor, pbc: Tensor, species: Tensor,
        edge_index: Tensor, edge_cell_shifts: Tensor, structure_index: Tensor,
    ) -> tuple[Tensor, ...]:
        graph = AtomicGraph(
            positions, cell, pbc, species, edge_index, edge_cell_shifts,
            structure_index, {},
        )
        outputs = self.model(graph, True, True)
        return tuple(outputs[name] for name in self.output_names)


def _flat(graph: AtomicGraph) -> tuple[Tensor, ...]:
    return (
        graph.positions, graph.cell, graph.pbc, graph.species, graph.edge_index,
        graph.edge_cell_shifts, graph.structure_index,
    )


def example_graph(
    model: torch.nn.Module, dtype: torch.dtype, device: str | torch.device
) -> AtomicGraph:
    """Two small periodic structures holding every species, with edges.

    The tracing and the load-time check run on it. Two structures of more than
    one atom each, because export specialises sizes 0 and 1 to constants.
    """
    import ase

    from pes_calc.graph import batch_graphs, graph_to
    from pes_calc.neighbors import atoms_to_graph

    cutoff = float(model.cutoff)
    generator = np.random.default_rng(0)
    structures = []
    for repeats in (2, 3):
        # a jittered simple-cubic lattice at half the cutoff: every atom has neighbours
        spacing = 0.5 * cutoff
        grid = np.stack(np.meshgrid(*[np.arange(repeats)] * 3), -1).reshape(-1, 3)
        positions = spacing * (grid + 0.1 * generator.standard_normal(grid.shape))
        symbols = [model.species[k % len(model.species)] for k in range(len(grid))]
        atoms = ase.Atoms(
            symbols, positions=positions, cell=np.eye(3) * spacing * repeats, pbc=True
        )
        structures.append(atoms_to_graph(atoms, model.species, cutoff, dtype=dtype))
    return graph_to(batch_graphs(structures), torch.device(device), dtype)


def _compile_aotinductor(
    model: torch.nn.Module, path: Path, metadata: dict[str, Any]
) -> None:
    """Trace, export and AOT-compile ``model`` into the package ``path``."""
    from pes_calc.io import save_model

    dtype, device = getattr(torch, metadata["dtype"]), metadata["device"]
    if torch.device(device).type == "cpu":
        # inductor writes serial loops for 1 thread and parallel ones (with atomic
        # adds for scatters) for more: a package runs best with the count it had
        metadata["cpu_threads"] = torch.get_num_threads()
    if hasattr(model, "ensemble_forces"):
        # ensemble forces take extra backward passes: the loaded artefact asks eager
        model.ensemble_forces = False
    for module in model.modules():
        # architectures' building blocks may choose an export-friendly formulation
        prepare = getattr(module, "prepare_for_export", None)
        if callable(prepare):
            prepare()
    graph = example_graph(model, dtype, device)
    names = [name for name in COMPILED_OUTPUTS if name in model(graph, True, True)]
    metadata["compiled_outputs"] = names
    cached = _cache_dir() / f"{_cache_key(model, metadata)}.pt2"
    with tempfile.TemporaryDirectory() as scratch:
        if not cached.exists():
            weights = Path(scratch) / WEIGHTS_FILE
            save_model(model, weights)
            package = Path(scratch) / "model.pt2"
            _export_and_compile(_FlatInputs(model, names), graph, package)
            with zipfile.ZipFile(package, "a") as archive:
                root = archive.namelist()[0].split("/")[0]
                archive.writestr(f"{root}/extra/{METADATA_FILE}", json.dumps(metadata))
                # not under extra/: the pt2 loader reads those as text
                archive.write(weights, f"{root}/pes_calc/{WEIGHTS_FILE}")
            seal(package)
            cached.parent.mkdir(parents=True, exist_ok=True)
            # write then rename: a concurrent or interrupted compile leaves no half file
            partial = cached.with_suffix(f".{os.getpid()}.partial")
            shutil.copyfile(package, partial)
            os.replace(partial, cached)
    shutil.copyfile(cached, path)


def _export_and_compile(flat: _FlatInputs, graph: AtomicGraph, package: Path) -> None:
    from torch.export import Dim
    from torch.fx.experimental.proxy_tensor import make_fx

    args = _flat(graph)
    # energy and its gradients in one graph: export cannot trace autograd.grad
    traced = make_fx(flat, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*args)
    atoms = Dim("num_atoms", min=1, max=2**31 - 2)
    edges = Dim("num_edges", min=1, max=2**31 - 2)
    structures = Dim("num_structures", min=1, max=2**31 - 2)
    dynamic_shapes = (
        {0: atoms}, {0: structures}, {0: structures}, {0: atoms},
        {1: edges}, {0: edges}, {0: atoms},
    )
    exported = torch.export.export(
        traced, args, dynamic_shapes=dynamic_shapes, strict=False
    )
    torch._inductor.aoti_compile_and_package(exported, package_path=str(package))


def _cache_dir() -> Path:
    root = os.environ.get("PES_CALC_CACHE_DIR") or Path.home() / ".cache" / "pes_calc"
    return Path(root) / "aotinductor"


def _cache_key(model: torch.nn.Module, metadata: dict[str, Any]) -> str:
    """A hash of the weights, of the metadata, which holds the hyperparameters,
    torch version, device and dtype, and of pes_calc's own source, whose code the
    package compiled (the .safetensors bytes are not stable: the order of their
    header's keys varies)."""
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for source in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(source.read_bytes())
    for name, tensor in sorted(model_state(model).items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


class AOTInductorPotential(torch.nn.Module):
    """A loaded ``.pt2`` package, called like a `Potential`.

    Calls the compiled graph for energy, forces and stress (and LLPR energy
    uncertainties); what it was not compiled for (LLPR ensemble forces, graphs
    without edges, another dtype or device after ``.to()``) goes to the eager model
    it carries.
    """

    def __init__(
        self, compiled: Any, eager: torch.nn.Module, output_names: list[str],
        dtype: torch.dtype, device: str | torch.device,
    ):
        super().__init__()
        self.compiled = compiled
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
        values = self.compiled(*_flat(graph))
        outputs = dict(zip(self.output_names, values, strict=True))
        if not compute_forces:
            outputs.pop(keys.FORCES, None)
        if not compute_stress:
            outputs.pop(keys.STRESS, None)
        return outputs


def _load_aotinductor(
    path: Path, metadata: dict[str, Any], device: str | torch.device
) -> torch.nn.Module:
    """The compiled package, or its eager model (with a warning) when the compiled
    code cannot run here or disagrees with eager on the example graph."""
    from pes_calc.io import load_model

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
    try:
        compiled = torch._inductor.aoti_load_package(str(path))
        loaded = AOTInductorPotential(
            compiled, eager, metadata["compiled_outputs"], dtype, device
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


def _check_against_eager(
    loaded: AOTInductorPotential, eager: torch.nn.Module, dtype: torch.dtype,
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
    from pes_calc.io import load_model, read_metadata

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
        raise ModelFileError(f"{path}: TorchScript could not load it: {error}") from error
    return module.eval(), metadata
