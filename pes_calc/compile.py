"""`compile_model`: a `Potential` (or an `LLPR` around one) → a TorchScript ``.pt``
or an AOTInductor ``.pt2`` that computes forces and stress inside the compiled graph.

Both archives carry the model's JSON metadata, the modules to import before
running it, and a SHA-256 seal; `pes_calc.artefacts` loads them.

AOTInductor: the energy and its backward pass are traced together into one graph
(``make_fx``; ``torch.export`` cannot trace ``autograd.grad`` itself), exported with
dynamic numbers of atoms, edges and structures, and compiled to a shared library in
a ``.pt2`` package, which also holds the eager model's weights (the load-time check
and the fallback). Long-range models take their cell-dependent integer data (Ewald's
k-vector indices, PME's mesh shape, direct-sum pairs) as further inputs, computed
by the package's wrapper (`pes_calc.nn.long_range.export_inputs`). Compiling takes
minutes, so packages are cached by (weights, torch version, device, dtype, CPU
threads, pes_calc's source) in
``$PES_CALC_CACHE_DIR`` (default ``~/.cache/pes_calc``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from e3nn.util.jit import script
from torch import Tensor
from torch.export import Dim
from torch.fx.experimental import _config as fx_config
from torch.fx.experimental.proxy_tensor import make_fx

from pes_calc.archive import seal
from pes_calc.artefacts import (
    METADATA_FILE,
    REQUIRED_IMPORTS,
    WEIGHTS_FILE,
    compiled_cpu_features,
)
from pes_calc.choices import as_device, as_dtype
from pes_calc.compiled_graph import (
    COMPILED_OUTPUTS,
    example_graph,
    flat_inputs,
    long_range_module,
    uses_neighbor_slots,
)
from pes_calc.graph import AtomicGraph, select_structures
from pes_calc.io import (
    FORMAT_TAG,
    FORMAT_VERSION,
    model_metadata,
    model_state,
    save_model,
)
from pes_calc.llpr import LLPR
from pes_calc.nn.long_range import MESH, export_input_names
from pes_calc.nn.neighbor_slots import NEIGHBOR_SLOTS
from pes_calc.potential import Potential

MODES = ("torchscript", "aotinductor")
# what each artefact suffix holds
SUFFIXES = {".pt2": "aotinductor", ".pt": "torchscript"}


# nequip's name for it
def enable_ForceStressOutput(model: Potential | LLPR) -> Potential | LLPR:  # noqa: N802
    """Compute forces and stress in an energy-only (``do_derivatives: false``) model."""
    model.do_derivatives = True
    return model


MODIFIERS: dict[str, Callable[[Potential | LLPR], Potential | LLPR]] = {
    "enable_ForceStressOutput": enable_ForceStressOutput,
}


def apply_modifiers(
    model: Potential | LLPR, modifiers: Sequence[str]
) -> Potential | LLPR:
    """Apply named model modifiers in order; unknown names raise ``ValueError``."""
    for name in modifiers:
        if name not in MODIFIERS:
            raise ValueError(
                f"unknown modifier {name!r}; available: {', '.join(sorted(MODIFIERS))}"
            )
        model = MODIFIERS[name](model)
    return model


def mode_for(path: str | os.PathLike, mode: str | None = None) -> str:
    """The artefact kind for ``path``: ``mode`` if given (it must agree with a
    ``.pt``/``.pt2`` suffix), else the kind the suffix names."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose from {MODES}")
    named = SUFFIXES.get(Path(path).suffix)
    if mode is None and named is None:
        raise ValueError(
            f"{path}: name the artefact .pt2 (AOTInductor) or .pt (TorchScript), "
            "or give its mode"
        )
    if mode is not None and named is not None and named != mode:
        raise ValueError(
            f"{path}: a {Path(path).suffix} file is a {named} artefact, not {mode}"
        )
    return mode or str(named)


def compile_model(
    model: Potential | LLPR,
    path: str | os.PathLike,
    *,
    mode: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    modifiers: Sequence[str] = (),
) -> None:
    """Write ``model`` as a compiled artefact at ``path``.

    Parameters
    ----------
    mode
        ``"aotinductor"`` (a ``.pt2`` package; minutes to compile, cached) or
        ``"torchscript"`` (a ``.pt`` file); None: the one ``path``'s suffix names.
    device, dtype
        Where and in which float type the artefact runs (dtype: the model's).
    modifiers
        Names from `MODIFIERS`, e.g. ``["enable_ForceStressOutput"]``.
    """
    mode = mode_for(path, mode)
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
        _compile_aotinductor(model, Path(path), metadata)
        return
    # e3nn's script recursively traces the submodules it marks "trace" (its gate
    # activations) and scripts the rest; plain torch.jit.script cannot do those
    scripted = script(model, in_place=True)
    torch.jit.save(
        scripted, str(path), _extra_files={METADATA_FILE: json.dumps(metadata)}
    )
    seal(path)


# ---- AOTInductor -------------------------------------------------------------------


class _FlatInputs(torch.nn.Module):
    """The model called on the graph's tensors, returning a tuple: the calling
    convention of an exported program. Properties (no labels) stay empty, or hold
    the ``extra_names`` inputs after the graph's (a long-range model's k-vector
    indices and pairs, `pes_calc.nn.long_range.export_inputs`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        output_names: Sequence[str],
        extra_names: Sequence[str] = (),
    ):
        super().__init__()
        self.model = model
        self.output_names = list(output_names)
        self.extra_names = list(extra_names)

    def graph(
        self,
        positions: Tensor,
        cell: Tensor,
        pbc: Tensor,
        species: Tensor,
        edge_index: Tensor,
        edge_cell_shifts: Tensor,
        structure_index: Tensor,
        *extra: Tensor,
    ) -> AtomicGraph:
        """The `AtomicGraph` of `forward`'s inputs."""
        return AtomicGraph(
            positions,
            cell,
            pbc,
            species,
            edge_index,
            edge_cell_shifts,
            structure_index,
            dict(zip(self.extra_names, extra, strict=True)),
        )

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        outputs = self.model(self.graph(*inputs), True, True)
        return tuple(outputs[name] for name in self.output_names)


def _compile_aotinductor(model: Any, path: Path, metadata: dict[str, Any]) -> None:
    """Trace, export and AOT-compile ``model`` into the package ``path``."""
    dtype, device = getattr(torch, metadata["dtype"]), metadata["device"]
    if torch.device(device).type == "cpu":
        # inductor writes serial loops for 1 thread and parallel ones (with atomic
        # adds for scatters) for more: a package runs best with the count it had
        metadata["cpu_threads"] = torch.get_num_threads()
        # so that a package moved to a CPU without them runs eager, not SIGILL
        metadata["cpu_features"] = compiled_cpu_features()
    if hasattr(model, "ensemble_forces"):
        # ensemble forces take extra backward passes: the loaded artefact asks eager
        model.ensemble_forces = False
    for module in model.modules():
        # architectures' building blocks may choose an export-friendly formulation
        prepare = getattr(module, "prepare_for_export", None)
        if callable(prepare):
            prepare()
    graph = example_graph(model, dtype, device)
    long_range = long_range_module(model)
    extra_names: list[str] = []
    if uses_neighbor_slots(model):
        # the slot width: the largest neighbour count, a size the data decides
        metadata["neighbor_slots"] = True
        extra_names.append(NEIGHBOR_SLOTS)
    if long_range is not None:
        # the Ewald sum's cell-dependent integer data: computed outside the graph
        metadata["long_range_inputs"] = spec = long_range.export_spec()
        extra_names += export_input_names(spec)
        if spec["method"] == "pme":
            # one mesh per call: trace on one periodic structure and the rest
            periodic: list[bool] = graph.pbc.any(dim=1).tolist()
            first = periodic.index(True)
            keep = [s for s, p in enumerate(periodic) if not p or s == first]
            graph = select_structures(graph, keep)
    flat = _FlatInputs(model, [], extra_names)
    args = flat_inputs(
        graph, metadata.get("long_range_inputs"), metadata.get("neighbor_slots", False)
    )
    example = model(flat.graph(*args), True, True)
    names = [name for name in COMPILED_OUTPUTS if name in example]
    metadata["compiled_outputs"] = flat.output_names = names
    cached = _cache_dir() / f"{_cache_key(model, metadata)}.pt2"
    with tempfile.TemporaryDirectory() as scratch:
        if not cached.exists():
            weights = Path(scratch) / WEIGHTS_FILE
            save_model(model, weights)
            package = Path(scratch) / "model.pt2"
            _export_and_compile(flat, args, package)
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


def _export_and_compile(
    flat: _FlatInputs, args: tuple[Tensor, ...], package: Path
) -> None:
    """Export ``flat`` on ``args`` (`flat_inputs`) with dynamic sizes and compile it
    into the package ``package``."""
    atoms = Dim("num_atoms", min=1, max=2**31 - 2)
    edges = Dim("num_edges", min=1, max=2**31 - 2)
    structures = Dim("num_structures", min=1, max=2**31 - 2)
    dynamic_shapes: tuple[dict[int, Any], ...] = (
        {0: atoms},
        {0: structures},
        {0: structures},
        {0: atoms},
        {1: edges},
        {0: edges},
        {0: atoms},
    )
    if NEIGHBOR_SLOTS in flat.extra_names:
        dynamic_shapes += ({0: Dim("neighbor_slots", min=2, max=2**31 - 2)},)
    long_range_names = [name for name in flat.extra_names if name != NEIGHBOR_SLOTS]
    direct_pairs = Dim("num_direct_pairs", min=1, max=2**31 - 2)
    if long_range_names and long_range_names[0] == MESH:
        # PME: the mesh (powers of 2: rfftn's last axis must be even) and the
        # direct-sum pairs
        half_z = Dim("half_mesh_z", min=1, max=2**14)
        dynamic_shapes += (
            {
                0: Dim("mesh_x", min=2, max=2**15),
                1: Dim("mesh_y", min=2, max=2**15),
                2: 2 * half_z,
            },
            {1: direct_pairs},
            {0: direct_pairs},
        )
    elif long_range_names:
        # Ewald: the k-vectors and the direct-sum pairs
        kvectors = Dim("num_kvectors", min=1, max=2**31 - 2)
        dynamic_shapes += (
            {0: kvectors},
            {0: kvectors},
            {1: direct_pairs},
            {0: direct_pairs},
        )
    sizes = {
        str(dim): int(args[index].shape[axis])
        for index, shape in enumerate(dynamic_shapes)
        for axis, dim in shape.items()
    }
    if min(sizes.values()) < 2:  # export would make them constants
        raise RuntimeError(f"the example graph's dynamic sizes must exceed 1: {sizes}")
    # equal example sizes would otherwise share one symbol (a long-range model's
    # k-vector and pair counts, PME's mesh axes may equal each other or the graph's)
    with fx_config.patch(use_duck_shape=not flat.extra_names):  # type: ignore[attr-defined]
        # energy and its gradients in one graph: export cannot trace autograd.grad
        traced = make_fx(flat, tracing_mode="symbolic", _allow_non_fake_inputs=True)(
            *args
        )
        exported = torch.export.export(
            traced, args, dynamic_shapes=dynamic_shapes, strict=False
        )
    # long-range models: with inductor's default fusion (up to 64 nodes per
    # kernel) their packages' stress came out wrong (torch 2.13, CPU: forces and
    # energies right; found with charges that depend on the edges, with both the
    # k-space and the slab terms); kernels of at most 2 nodes give eager's numbers
    fusion = {"max_fusion_size": 2} if long_range_names else {}
    with warnings.catch_warnings(), torch._inductor.config.patch(fusion):
        # inductor imports torch.utils.mkldnn, whose classes still use
        # torch.jit.script_method: torch's deprecation, not the user's TorchScript
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.", category=DeprecationWarning
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
