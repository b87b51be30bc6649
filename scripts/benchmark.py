"""Speed of pes_calc's ASE calculator (with --peers: of the peers' on the same work).

Systems: periodic fcc Cu (a = 3.61 Å, rattled 0.05 Å with seed 0) with 32, 256, 2048
and 16384 atoms, and a non-periodic 147-atom Cu icosahedron (``cluster``). Models:
untrained (timing does not depend on the weights), cutoff 5 Å, float32, at the sizes
of issue 6 (`MODELS`): SOAP-BPNN with metatrain's defaults; NequIP l_max 2, 4 layers,
32 features; Allegro l_max 2, 2 layers, 64 scalar / 16 tensor features, MLP 1×128.

Modes, each energy+forces+stress (energy+forces for the cluster) per evaluation:

- ``single``: one calculator call after a small random move of every atom (σ 2 mÅ);
- ``md``: ASE VelocityVerlet steps (2 fs, 300 K Maxwell-Boltzmann start). ASE's
  integrator asks only for forces; every step here asks for all three properties
  at once (as `compute` does), so each calculator does one evaluation per step.

Artefacts: eager (``.safetensors``), TorchScript (``pes-calc compile``) and
AOTInductor (``compile_model(..., mode="aotinductor")``, reported n/a where that is
not available). Each (architecture, artefact, system) runs in its own subprocess,
so that its memory is its own: the peak resident memory during the calls
(VmHWM, reset after loading with /proc/self/clear_refs; ru_maxrss elsewhere), its
growth over the resident memory before the first call (Δ RSS) and, on CUDA,
``torch.cuda.max_memory_allocated``. After ``--warmup`` evaluations, up to
``--calls`` calls / ``--steps`` steps are timed, fewer when they exceed ``--budget``
seconds (at least ``--min-calls``): big systems get fewer steps, and the
``n`` column says how many. Figures are medians over the timed evaluations.

The profile splits each evaluation of pes_calc (wall clock, ``time.perf_counter``
around PESCalculator's stages, instrumented here by a subclass): neighbor list
(``_current_graph``: skin check or rebuild, cutoff filter, tensor conversion), model
forward (``predict_energies``), backward (``add_derivatives``) and the rest
(calculator overhead: ASE's state check, result conversion, Python). An AOTInductor
artefact is one call: forward + backward together.

    python scripts/benchmark.py --threads 1 --systems 32 256 --json out.json
    python scripts/benchmark.py --threads 1 --peers --json benchmarks/cpu.json --readme

``--peers`` also runs ``scripts/peers/benchmark_peers.py`` (nequip, nequip-allegro,
metatrain and MACE in their own virtualenvs, see scripts/peers/README.md) on the
same systems in the same way, and prints peer ms / pes_calc ms side by side.
This module is the harness for both: it imports only numpy and ase at the top, so
the peers' virtualenvs can import it without pes_calc.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ase
import ase.build
import numpy as np
from ase import units

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_BEGIN, README_END = "<!-- BENCHMARK BEGIN -->", "<!-- BENCHMARK END -->"

MODELS: dict[str, dict[str, Any]] = {
    "soap_bpnn": {},
    "nequip": {"r_max": 5.0, "l_max": 2, "num_layers": 4, "num_features": 32},
    "allegro": {
        "r_max": 5.0,
        "l_max": 2,
        "num_layers": 2,
        "num_scalar_features": 64,
        "num_tensor_features": 16,
        "allegro_mlp_hidden_layers_depth": 1,
        "allegro_mlp_hidden_layers_width": 128,
    },
}
# the normalisation constant of NequIP/Allegro: about 43 neighbors within 5 Å in fcc Cu
AVG_NUM_NEIGHBORS = 43.0
SYSTEMS = ["32", "256", "2048", "16384", "cluster"]
ARTEFACTS = ["eager", "torchscript", "aotinductor"]
MODES = ["single", "md"]
SUFFIX = {"eager": ".safetensors", "torchscript": ".pt", "aotinductor": ".pt2"}
# virtualenvs of the peers (scripts/peers/README.md); overridable for other machines
PEER_PYTHON = {
    "nequip": os.environ.get(
        "PES_BENCH_NEQUIP_PYTHON", "/work/peers/bench-venv/bin/python"
    ),
    "allegro": os.environ.get(
        "PES_BENCH_NEQUIP_PYTHON", "/work/peers/bench-venv/bin/python"
    ),
    "soap_bpnn": os.environ.get(
        "PES_BENCH_METATRAIN_PYTHON", "/work/peers/metatrain-venv/bin/python"
    ),
    "mace": os.environ.get("PES_BENCH_MACE_PYTHON", "/work/peers/mace-venv/bin/python"),
}
PEER_SCRIPT = ROOT / "scripts" / "peers" / "benchmark_peers.py"
# compiled peer artefacts are kept between runs (nequip's AOTInductor takes minutes)
CACHE = Path(
    os.environ.get("PES_BENCH_CACHE", Path.home() / ".cache" / "pes_calc_bench")
)
DEFAULT_SPEC = {
    "modes": ["single", "md"],
    "calls": 10,
    "steps": 10,
    "warmup": 2,
    "budget": 20.0,
    "min_calls": 2,
    "threads": 1,
    "device": "cpu",
}
# nequip-allegro's eager model multiplies out its tensor products (made to be fused by
# a compiler): 5-10 s per call at 256 atoms here, so the eager peers stop at 256 atoms
PEER_EAGER_SYSTEMS = {
    "nequip": ["32", "256", "cluster"],
    "allegro": ["32", "256", "cluster"],
}
# what a record copies from its spec
RECORD_KEYS = (
    "code",
    "architecture",
    "artefact",
    "system",
    "label",
    "parameters",
    "compile_s",
)


# ---------------------------------------------------------------------------------
# the harness (shared with scripts/peers/benchmark_peers.py)


def copper(num_atoms: int) -> ase.Atoms:
    """A rattled fcc Cu cell with about ``num_atoms`` atoms (4 n³)."""
    repeat = max(1, round((num_atoms / 4) ** (1 / 3)))
    atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True) * ((repeat,) * 3)
    atoms.rattle(0.05, seed=0)
    return atoms


def make_system(name: str) -> ase.Atoms:
    """A system by its name in `SYSTEMS`: an atom count (fcc Cu) or ``cluster``."""
    if name == "cluster":
        from ase.cluster import Icosahedron

        atoms = Icosahedron("Cu", noshells=4)  # 147 atoms, no cell, no periodicity
        atoms.rattle(0.05, seed=0)
        return atoms
    return copper(int(name))


def properties_of(atoms: ase.Atoms) -> list[str]:
    """What each evaluation asks for: stress too where the cell has a volume."""
    if np.any(atoms.pbc) and atoms.cell.volume > 1e-12:
        return ["energy", "forces", "stress"]
    return ["energy", "forces"]


def compute(calc: Any, atoms: ase.Atoms, properties: Sequence[str]) -> dict:
    """ASE's ``get_property`` logic, asking for all ``properties`` in one call.

    ``atoms.get_potential_energy(); atoms.get_forces(); ...`` would cost calculators
    that compute only what is asked (metatomic's) one evaluation per property, and
    ASE's ``calculate_properties`` reports every system change (forcing neighbor
    lists to be rebuilt); this does neither.
    """
    changes = calc.check_state(atoms)
    if changes:
        calc.atoms = None
        calc.results = {}
    if any(name not in calc.results for name in properties):
        calc.atoms = atoms.copy()
        calc.calculate(atoms, list(properties), changes)
    return calc.results


class AllAtOnce:
    """Stands in for a calculator in MD: any property request computes all of them."""

    def __init__(self, calc: Any, properties: Sequence[str]):
        self.calc = calc
        self.properties = list(properties)
        self.implemented_properties = list(properties)

    def get_property(self, name: str, atoms: ase.Atoms, allow_calculation: bool = True):
        value = compute(self.calc, atoms, self.properties)[name]
        return value.copy() if isinstance(value, np.ndarray) else value

    def get_forces(self, atoms: ase.Atoms):
        return self.get_property("forces", atoms)

    def get_potential_energy(self, atoms: ase.Atoms, force_consistent: bool = False):
        return self.get_property("energy", atoms)

    def get_stress(self, atoms: ase.Atoms):
        return self.get_property("stress", atoms)


class Stages:
    """Wall-clock seconds per named stage, accumulated while ``active``."""

    def __init__(self, sync: Callable[[], None] = lambda: None):
        self.sync = sync
        self.active = False
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        if self.active:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds


def _timed(
    evaluate: Callable[[], None],
    count: int,
    warmup: int,
    budget: float,
    min_count: int,
    stages: Stages | None,
    sync: Callable[[], None],
) -> tuple[list[float], dict[str, float]]:
    """ms of up to ``count`` evaluations after ``warmup``, within ``budget`` s."""
    for _ in range(warmup):
        evaluate()
    sync()
    times: list[float] = []
    if stages is not None:
        stages.seconds, stages.active = {}, True
    started = time.perf_counter()
    while len(times) < count and (
        len(times) < min_count or time.perf_counter() - started < budget
    ):
        start = time.perf_counter()
        evaluate()
        sync()
        times.append(1000 * (time.perf_counter() - start))
    shares: dict[str, float] = {}
    if stages is not None:
        stages.active = False
        total = sum(times) / 1000
        shares = {name: seconds / total for name, seconds in stages.seconds.items()}
        shares["overhead"] = max(0.0, 1.0 - sum(shares.values()))
    return times, shares


def measure(
    calc: Any,
    atoms: ase.Atoms,
    mode: str,
    *,
    count: int,
    warmup: int,
    budget: float,
    min_count: int,
    stages: Stages | None = None,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Time ``calc`` on a copy of ``atoms`` in ``mode`` (``single`` or ``md``)."""
    atoms = atoms.copy()
    properties = properties_of(atoms)
    if mode == "single":
        rng = np.random.default_rng(1)

        def evaluate() -> None:
            atoms.positions += rng.normal(0.0, 0.002, atoms.positions.shape)
            compute(calc, atoms, properties)

    elif mode == "md":
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
        from ase.md.verlet import VelocityVerlet

        MaxwellBoltzmannDistribution(
            atoms, temperature_K=300, rng=np.random.default_rng(0)
        )
        Stationary(atoms)
        atoms.calc = AllAtOnce(calc, properties)
        dynamics = VelocityVerlet(atoms, timestep=2 * units.fs)

        def evaluate() -> None:
            dynamics.run(1)

    else:
        raise ValueError(f"unknown mode {mode!r}")
    times, shares = _timed(evaluate, count, warmup, budget, min_count, stages, sync)
    ms = statistics.median(times)
    return {
        "mode": mode,
        "ms": ms,
        "ms_mean": statistics.fmean(times),
        "ms_min": min(times),
        "n": len(times),
        "atom_steps_per_s": len(atoms) / (ms / 1000),
        "shares": shares,
    }


def maxrss_mb() -> float:
    """Peak resident memory of this process so far (Linux: ru_maxrss is in KiB)."""
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> float:
    """Current resident memory (MB), after resetting the peak where Linux allows it
    (so that the peak seen later is that of the calls, not of loading the model)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return maxrss_mb()
    return _status_mb("VmRSS") or maxrss_mb()


def peak_rss_mb() -> float:
    """Peak resident memory since `reset_peak_rss` (or since the start)."""
    return _status_mb("VmHWM") or maxrss_mb()


def run_worker(
    spec: dict[str, Any], make: Callable[[dict[str, Any]], tuple[Any, Stages | None]]
) -> dict[str, Any]:
    """Measure one (code, architecture, artefact, system) in every mode of ``spec``.

    ``make(spec)`` returns the calculator and, if it is instrumented, its `Stages`.
    """
    import torch

    torch.set_num_threads(spec["threads"])
    cuda = spec["device"].startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    load_before = os.getloadavg()
    atoms = make_system(spec["system"])
    started = time.perf_counter()
    calc, stages = make(spec)
    setup_s = time.perf_counter() - started
    load_peak = maxrss_mb()
    rss_before = reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    record: dict[str, Any] = {key: spec[key] for key in RECORD_KEYS if key in spec}
    record.update(
        atoms=len(atoms),
        threads=torch.get_num_threads(),
        device=spec["device"],
        torch=torch.__version__,
        setup_s=setup_s,
        results={},
    )
    big = len(atoms) >= 2048
    for mode in spec["modes"]:
        record["results"][mode] = measure(
            calc,
            atoms,
            mode,
            count=spec["steps"] if mode == "md" else spec["calls"],
            warmup=1 if big else spec["warmup"],
            budget=spec["budget"],
            min_count=spec["min_calls"],
            stages=stages,
            sync=sync,
        )
    record["peak_rss_mb"] = max(peak_rss_mb(), rss_before)
    record["rss_before_mb"] = rss_before
    record["load_peak_rss_mb"] = load_peak
    record["delta_rss_mb"] = record["peak_rss_mb"] - rss_before
    if cuda:
        record["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if getattr(calc, "bench_note", None):
        record["note"] = calc.bench_note
    for name in ("neighbor_list_builds", "neighbor_list_reuses"):
        if hasattr(calc, name):
            record[name] = getattr(calc, name)
    record["reuse_freed_memory"] = reuses_freed_memory()
    record["loadavg_before"] = load_before
    record["loadavg_after"] = os.getloadavg()
    return record


def reuses_freed_memory() -> bool:
    """Whether this process keeps freed memory for reuse: pes_calc's setting (on where
    an AOTInductor package runs), or glibc's own variable (how the peers can be run)."""
    memory = sys.modules.get("pes_calc.memory")
    if memory is not None and memory.freed_memory_reused():
        return True
    return os.environ.get("MALLOC_MMAP_MAX_") == "0"


def launch(
    python: str, script: Path, spec: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """Run ``script --worker SPEC`` with ``python`` in a fresh process; its record."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(spec["threads"]),
        MKL_NUM_THREADS=str(spec["threads"]),
        PYTHONWARNINGS="ignore",
    )
    base = {key: spec[key] for key in RECORD_KEYS if key in spec}
    try:
        done = subprocess.run(
            [python, str(script), "--worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {**base, "error": " | ".join(tail) or f"exit status {done.returncode}"}


def worker_main(make: Callable[[dict[str, Any]], tuple[Any, Stages | None]]) -> None:
    """Entry point of ``--worker SPEC``: print the record as one ``RESULT`` line."""
    spec = json.loads(sys.argv[sys.argv.index("--worker") + 1])
    record = run_worker(spec, make)
    print("RESULT " + json.dumps(record), flush=True)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# ---------------------------------------------------------------------------------
# pes_calc's side


def time_calls(
    calculator: Any, atoms: ase.Atoms, calls: int, warmup: int
) -> list[float]:
    """Wall-clock ms of each energy+forces+stress call after a small move
    (kept for scripts/benchmark_llpr.py)."""
    times, _ = _timed(
        _single_call(calculator, atoms),
        calls,
        warmup,
        float("inf"),
        calls,
        None,
        lambda: None,
    )
    return times


def _single_call(calculator: Any, atoms: ase.Atoms) -> Callable[[], None]:
    atoms = atoms.copy()
    properties = properties_of(atoms)
    rng = np.random.default_rng(1)

    def evaluate() -> None:
        atoms.positions += rng.normal(0.0, 0.002, atoms.positions.shape)
        compute(calculator, atoms, properties)

    return evaluate


class _TimedModel:
    """Calls a Potential (eager or TorchScript) as ``forward`` does, timing its
    forward (``predict_energies``) and backward (``add_derivatives``) apart."""

    def __init__(self, model: Any, stages: Stages):
        self.model, self.stages = model, stages
        self.split = hasattr(model, "predict_energies") and hasattr(
            model, "add_derivatives"
        )

    def __call__(self, graph: Any, compute_forces: bool, compute_stress: bool) -> Any:
        stages = self.stages
        start = time.perf_counter()
        if not self.split:  # one compiled call (AOTInductor)
            outputs = self.model(graph, compute_forces, compute_stress)
            stages.sync()
            stages.add("model", time.perf_counter() - start)
            return outputs
        outputs, positions, strain = self.model.predict_energies(
            graph, compute_forces, compute_stress
        )
        stages.sync()
        middle = time.perf_counter()
        outputs = self.model.add_derivatives(
            outputs, graph, positions, strain, compute_forces, compute_stress, False
        )
        stages.sync()
        stages.add("forward", middle - start)
        stages.add("backward", time.perf_counter() - middle)
        return outputs

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def _make_pes_calc(spec: dict[str, Any]) -> tuple[Any, Stages | None]:
    import torch

    from pes_calc import PESCalculator

    cuda = spec["device"].startswith("cuda")
    stages = Stages(torch.cuda.synchronize if cuda else (lambda: None))

    class InstrumentedCalculator(PESCalculator):
        def _current_graph(self, atoms, system_changes):  # noqa: ANN001, ANN202
            start = time.perf_counter()
            graph = super()._current_graph(atoms, system_changes)
            stages.sync()
            stages.add("neighbors", time.perf_counter() - start)
            return graph

    if not spec.get("profile", True):
        return PESCalculator(spec["path"], device=spec["device"]), None
    calc = InstrumentedCalculator(spec["path"], device=spec["device"])
    if spec["artefact"] == "aotinductor" and not hasattr(calc.model, "compiled"):
        # the loader falls back to the eager model when the compiled one fails
        calc.bench_note = "AOTInductor artefact fell back to eager at load"
    calc.model = _TimedModel(calc.model, stages)
    return calc, stages


def prepare_artefacts(
    architecture: str, artefacts: Sequence[str], folder: Path, device: str, threads: int
) -> dict[str, dict[str, Any]]:
    """Build the untrained model and write each artefact; {artefact: info}.

    Compiled with the threads the timing uses (AOTInductor's loops depend on them).
    """
    import torch

    from pes_calc import build_model, save_model
    from pes_calc.compile import compile_model

    torch.set_num_threads(threads)

    extra = (
        {} if architecture == "soap_bpnn" else {"avg_num_neighbors": AVG_NUM_NEIGHBORS}
    )
    model = build_model(architecture, ["Cu"], seed=0, **MODELS[architecture], **extra)
    parameters = sum(p.numel() for p in model.parameters())
    info: dict[str, dict[str, Any]] = {}
    for artefact in artefacts:
        path = folder / f"{architecture}{SUFFIX[artefact]}"
        started = time.perf_counter()
        try:
            if artefact == "eager":
                save_model(model, path)
            else:
                compile_model(model, path, mode=artefact, device=device)
        except Exception as error:  # noqa: BLE001 (reported as n/a, with the reason)
            lines = str(error).strip().splitlines()
            reason = f"{type(error).__name__}: {lines[0] if lines else ''}"
            info[artefact] = {"error": reason[:300]}
            continue
        info[artefact] = {
            "path": str(path),
            "compile_s": time.perf_counter() - started,
            "parameters": parameters,
        }
    del torch
    return info


def _systems_for(args: argparse.Namespace, architecture: str) -> list[str]:
    """The systems one model runs on: > 2048 atoms only for --big-architectures."""
    return [
        s
        for s in args.systems
        if s == "cluster" or int(s) <= 2048 or architecture in args.big_architectures
    ]


def prepare_ours(args: argparse.Namespace, architecture: str, folder: Path) -> dict:
    """Our artefacts of one architecture: {artefact: info} (in ``folder``)."""
    print(
        f"[{architecture}] preparing {', '.join(args.artefacts)}",
        file=sys.stderr,
        flush=True,
    )
    info = prepare_artefacts(
        architecture, args.artefacts, folder, args.device, args.threads
    )
    for artefact, entry in info.items():
        entry["label"] = f"pes_calc {artefact}"
        if "error" in entry:
            print(
                f"[{architecture}] {artefact}: n/a ({entry['error']})", file=sys.stderr
            )
    return info


def prepare_peer(args: argparse.Namespace, peer: str) -> dict:
    """A peer's artefacts, built in its virtualenv: {artefact: info}, or {"": error}."""
    python = PEER_PYTHON[peer]
    if not Path(python).exists():
        return {"": {"error": f"no virtualenv at {python}"}}
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [
            python,
            str(PEER_SCRIPT),
            "--peer",
            peer,
            "--prepare-only",
            "--json",
            out.name,
            "--spec",
            json.dumps(_common_spec(args)),
        ]
        print(f"[{peer}] preparing in {python}", file=sys.stderr, flush=True)
        done = subprocess.run(
            command, cwd=ROOT, env=dict(os.environ, PYTHONWARNINGS="ignore")
        )
        if done.returncode != 0 or not Path(out.name).stat().st_size:
            return {"": {"error": f"benchmark_peers.py exited with {done.returncode}"}}
        return json.loads(Path(out.name).read_text())


def run_one(
    args: argparse.Namespace,
    code: str,
    architecture: str,
    artefact: str,
    info: dict,
    system: str,
) -> dict:
    """One (code, architecture, artefact, system) in its own subprocess."""
    spec = {
        **_common_spec(args),
        **info,
        "code": code,
        "architecture": architecture,
        "artefact": artefact,
        "system": system,
    }
    if code == "pes_calc":
        spec["profile"] = not args.no_profile
        python, script = sys.executable, Path(__file__)
    else:
        python, script = PEER_PYTHON[code], PEER_SCRIPT
    if "error" in info:
        record = {key: spec[key] for key in RECORD_KEYS if key in spec}
        record["error"] = info["error"]
    else:
        record = launch(python, script, spec, args.timeout)
    _progress(record)
    return record


def run_architecture(
    args: argparse.Namespace, architecture: str, folder: Path, peers: list[str]
) -> list[dict]:
    """Ours and the peer's, interleaved system by system (so both see similar load)."""
    codes = {}
    if not args.peers_only and architecture in MODELS:
        codes["pes_calc"] = prepare_ours(args, architecture, folder)
    if architecture in peers:
        codes[architecture] = prepare_peer(args, architecture)
    records = []
    for system in _systems_for(args, architecture):
        for code, artefacts in codes.items():
            for artefact, info in artefacts.items():
                if code != "pes_calc" and not _peer_wants(code, artefact, system):
                    continue
                records.append(
                    run_one(args, code, architecture, artefact, info, system)
                )
    return records


def _peer_wants(peer: str, artefact: str, system: str) -> bool:
    return artefact != "eager" or system in PEER_EAGER_SYSTEMS.get(peer, SYSTEMS)


def _common_spec(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "modes": args.modes,
        "calls": args.calls,
        "steps": args.steps,
        "warmup": args.warmup,
        "budget": args.budget,
        "min_calls": args.min_calls,
        "threads": args.threads,
        "device": args.device,
    }


def _progress(record: dict) -> None:
    label = (
        f"{record.get('code')} {record.get('architecture')} "
        f"{record.get('artefact', '')} {record.get('system', '')}"
    )
    if "error" in record:
        print(f"  {label}: n/a ({record['error'][:160]})", file=sys.stderr, flush=True)
        return
    parts = [
        f"{mode} {r['ms']:.1f} ms (n={r['n']})" for mode, r in record["results"].items()
    ]
    print(
        f"  {label}: {', '.join(parts)}, ΔRSS {record['delta_rss_mb']:.0f} MB",
        file=sys.stderr,
        flush=True,
    )


# ---------------------------------------------------------------------------------
# tables


def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "n/a"
    return f"{ms:.3g}" if ms < 10 else f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}"


def _system_label(system: str) -> str:
    return "cluster (147)" if system == "cluster" else system


def _ms(record: dict | None, mode: str) -> float | None:
    if not record or "error" in record or mode not in record.get("results", {}):
        return None
    return record["results"][mode]["ms"]


def ours_table(records: list[dict], systems: Sequence[str]) -> str:
    """A row per architecture × artefact × system: times, profile, memory."""
    lines = [
        "| model | artefact | atoms | single (ms) | MD (ms/step) | atoms·steps/s | n | "
        "neighbors | forward | backward | overhead | peak RSS (MB) | Δ RSS (MB) | "
        "load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {system: index for index, system in enumerate(systems)}
    ours = sorted(
        (r for r in records if r.get("code") == "pes_calc"),
        key=lambda r: (
            list(MODELS).index(r["architecture"]),
            order.get(r["system"], 99),
            ARTEFACTS.index(r["artefact"]),
        ),
    )
    for record in ours:
        if "error" in record:
            continue
        results = record["results"]
        md = results.get("md") or results.get("single")
        shares = md["shares"]
        cells = [shares.get(name) for name in ("neighbors", "forward", "backward")]
        if "model" in shares:  # one compiled call: forward + backward together
            cells = [shares.get("neighbors"), shares["model"], None]
        share_text = [f"{100 * s:.0f}%" if s is not None else "–" for s in cells]
        counts = "/".join(str(r["n"]) for r in results.values())
        lines.append(
            f"| {record['architecture']} | {record['artefact']}"
            f"{' (' + record['note'] + ')' if record.get('note') else ''} | "
            f"{_system_label(record['system'])} | {_fmt_ms(_ms(record, 'single'))} | "
            f"{_fmt_ms(_ms(record, 'md'))} | {md['atom_steps_per_s']:,.0f} | "
            f"{counts} | "
            f"{' | '.join(share_text)} | {100 * shares.get('overhead', 0):.0f}% | "
            f"{record['peak_rss_mb']:.0f} | {record['delta_rss_mb']:.0f} | "
            f"{record['loadavg_before'][0]:.1f} |"
        )
    unavailable = sorted(
        {
            (r["architecture"], r["artefact"], r["error"][:120])
            for r in ours
            if "error" in r
        }
    )
    notes = [f"- {a} {b}: n/a ({e})" for a, b, e in unavailable]
    return "\n".join(lines + ([""] + notes if notes else []))


def best_ours(
    records: list[dict], architecture: str, system: str, mode: str
) -> dict | None:
    """Our fastest artefact for one architecture, system and mode."""
    candidates = [
        r
        for r in records
        if r.get("code") == "pes_calc"
        and r.get("architecture") == architecture
        and r.get("system") == system
        and _ms(r, mode) is not None
    ]
    return min(candidates, key=lambda r: _ms(r, mode), default=None)


def ratio_table(records: list[dict], systems: Sequence[str]) -> str:
    """Peer ms / pes_calc ms (our fastest artefact) per model, system and mode."""
    lines = [
        "| model | peer (fast path) | atoms | pes_calc single (ms) | "
        "peer single (ms) | ratio | pes_calc MD (ms/step) | peer MD (ms/step) | "
        "ratio | Δ RSS pes_calc / peer (MB) | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {system: index for index, system in enumerate(systems)}
    peers = sorted(
        (r for r in records if r.get("code") not in (None, "pes_calc")),
        key=lambda r: (
            r.get("architecture", ""),
            order.get(r.get("system"), 99),
            r.get("artefact", ""),
        ),
    )
    for peer in peers:
        if "error" in peer or "system" not in peer:
            continue
        architecture = peer["architecture"]
        cells = []
        for mode in MODES:
            mine = best_ours(records, architecture, peer["system"], mode)
            ms, theirs = _ms(mine, mode), _ms(peer, mode)
            ratio = f"**{theirs / ms:.2f}**" if ms and theirs else "–"
            label = f"{_fmt_ms(ms)} ({mine['artefact']})" if mine else "–"
            cells += [label, _fmt_ms(theirs), ratio]
        mine = best_ours(records, architecture, peer["system"], "md")
        memory = f"{mine['delta_rss_mb']:.0f} / " if mine else "– / "
        lines.append(
            f"| {architecture} | {peer.get('label') or peer['code']} | "
            f"{_system_label(peer['system'])} | {' | '.join(cells)} | "
            f"{memory}{peer['delta_rss_mb']:.0f} | {peer['loadavg_before'][0]:.1f} |"
        )
    failed = sorted(
        {
            (r.get("code"), r.get("system", ""), r["error"][:160])
            for r in peers
            if "error" in r
        }
    )
    notes = [f"- {c} {s}: n/a ({e})" for c, s, e in failed]
    return "\n".join(lines + ([""] + notes if notes else []))


def report(meta: dict, records: list[dict], systems: Sequence[str]) -> str:
    load = meta["loadavg_start"], meta["loadavg_end"]
    head = (
        f"{meta['cpu']}, {meta['cores']} cores; {meta['threads']} thread(s), device "
        f"{meta['device']}; torch {meta['torch']}; {meta['date']}; load average "
        f"{load[0][0]:.2f} at the start, {load[1][0]:.2f} at the end (1 min)."
    )
    text = [head, "", ours_table(records, systems)]
    if any(r.get("code") not in (None, "pes_calc") for r in records):
        text += [
            "",
            "Ratios (peer ms / pes_calc ms; > 1: pes_calc is faster):",
            "",
            ratio_table(records, systems),
        ]
    return "\n".join(text)


def merge_records(records: list[dict], newer: list[dict]) -> list[dict]:
    """``records`` with ``newer`` added; a newer record of the same (code,
    architecture, artefact, system) takes the older one's place."""

    def key(record: dict) -> tuple:
        return tuple(
            record.get(k) for k in ("code", "architecture", "artefact", "system")
        )

    replacements = {key(r): r for r in newer}
    merged = [replacements.pop(key(r), r) for r in records]
    return merged + [r for r in newer if key(r) in replacements]


def rewrite_readme(block: str) -> None:
    """Replace the text between the BENCHMARK markers of README.md by ``block``."""
    text = README.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"README.md has no {README_BEGIN} … {README_END} block")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    README.write_text(f"{head}{README_BEGIN}\n{block}\n{README_END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--architectures", nargs="+", default=list(MODELS), choices=MODELS
    )
    parser.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS)
    parser.add_argument("--artefacts", nargs="+", default=ARTEFACTS, choices=ARTEFACTS)
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument(
        "--calls", type=int, default=10, help="timed single calls (at most)"
    )
    parser.add_argument(
        "--steps", type=int, default=10, help="timed MD steps (at most)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="(1 from 2048 atoms on)")
    parser.add_argument(
        "--budget",
        type=float,
        default=20.0,
        help="seconds per mode and configuration before timing stops",
    )
    parser.add_argument(
        "--min-calls", type=int, default=2, help="timed even over budget"
    )
    parser.add_argument(
        "--big-architectures",
        nargs="+",
        default=["soap_bpnn", "allegro"],
        help="models run above 2048 atoms (others are skipped there, peers too)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--peers", action="store_true", help="also run the peers")
    parser.add_argument("--peers-only", action="store_true")
    parser.add_argument(
        "--peer-list",
        nargs="+",
        default=["soap_bpnn", "nequip", "allegro", "mace"],
        help="which peers (architecture names, and mace)",
    )
    parser.add_argument(
        "--no-profile",
        action="store_true",
        help="time the plain PESCalculator, without stage timers",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="per subprocess")
    parser.add_argument("--json", type=Path, help="write all records and metadata here")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=[],
        help="add the records of earlier --json files (e.g. a 16384-atom run); a later "
        "file's record of the same code, model, artefact and system replaces an "
        "earlier one",
    )
    parser.add_argument("--readme", action="store_true", help="rewrite README's block")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only print (and --readme) the tables of --merge files",
    )
    args = parser.parse_args()

    import torch

    meta = {
        **machine(),
        "threads": args.threads,
        "device": args.device,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "loadavg_start": os.getloadavg(),
        "argv": sys.argv[1:],
    }
    records: list[dict] = []
    for earlier in args.merge:
        records = merge_records(records, json.loads(earlier.read_text())["records"])
    if args.report_only:
        if not args.merge:
            raise SystemExit("--report-only needs --merge FILE")
        meta = json.loads(args.merge[0].read_text())["meta"]
    else:
        folder = Path(tempfile.mkdtemp(prefix="pes-bench-"))
        try:
            peers = [p for p in args.peer_list if args.peers or args.peers_only]
            for architecture in [
                *args.architectures,
                *(["mace"] if "mace" in peers else []),
            ]:
                records += run_architecture(args, architecture, folder, peers)
                if args.json:  # a long run that is cut short keeps what it measured
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps({"meta": meta, "records": records}))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        meta["loadavg_end"] = os.getloadavg()
    systems = list(
        dict.fromkeys(
            [*args.systems, *(r.get("system") for r in records if r.get("system"))]
        )
    )
    text = report(meta, records, systems)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    if args.readme:
        rewrite_readme(text)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        import pes_calc

        # what the pes-calc commands do: before any large tensor exists (README,
        # "Memory settings"); PES_CALC_REUSE_FREED_MEMORY=0 measures without it
        pes_calc.reuse_freed_memory()
        worker_main(_make_pes_calc)
    else:
        main()
