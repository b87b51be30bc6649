"""Structures per second of batched evaluation (`pes_calc.evaluate`) against a loop
of `PESCalculator` calls, for screening and active-learning scoring.

Each method computes energy, per-atom energies, forces and stress (and, for an
LLPR model, σ_E and per-atom σ) of every structure in a list:

- ``loop``: one `PESCalculator` (default skin) and ``atoms.calc = calc`` per
  structure, as a user would write it;
- ``evaluate B``: ``pes_calc.evaluate(model, structures, batch_size=B)``, one graph
  and one forward+backward pass per B structures.

Two workloads: ``--count`` generated cells of fcc Cu (2×2×2 cubic, 32 atoms,
random ±2% strain, rattled by 0.1 Å), and the structures of ``--data``
(data/cu-emt/test.xyz: bulk, slabs and clusters of 19–108 atoms). Each figure is
the best of ``--repeats`` passes over the whole list after one warm-up pass;
the methods take turns, so that the shared machine's load falls on all alike.

    python scripts/benchmark_evaluate.py --threads 1 [--models ...] [--count 256]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import ase
import ase.build
import ase.io
import numpy as np
import torch

from pes_calc import PESCalculator, evaluate

ROOT = Path(__file__).resolve().parent.parent
MODELS = [
    "models/cu-emt-soap-bpnn.safetensors",
    "models/cu-emt-soap-bpnn-llpr.safetensors",
    "models/cu-emt-allegro.safetensors",
]


def rattled_copper(count: int, seed: int = 0) -> list[ase.Atoms]:
    """``count`` strained, rattled 32-atom fcc Cu cells."""
    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(count):
        atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 2, 2)
        strain = np.eye(3) + rng.uniform(-0.02, 0.02, (3, 3))
        atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
        atoms.rattle(0.1, seed=int(rng.integers(1 << 30)))
        cells.append(atoms)
    return cells


def loop(calculator: PESCalculator, structures: list[ase.Atoms]) -> None:
    """What a screening loop over an ASE calculator does."""
    for atoms in structures:
        atoms.calc = calculator
        atoms.get_potential_energy()  # one model call fills every property
        atoms.get_forces()
        if atoms.cell.volume > 1e-12 and any(atoms.pbc):
            atoms.get_stress()
        atoms.calc = None


def best_times(
    works: dict[str, Callable[[], object]], repeats: int
) -> dict[str, float]:
    """Seconds of the fastest of ``repeats`` runs of each work, after one warm-up
    run each; the works take turns, so that a change in the machine's load (it
    is shared) falls on all of them alike."""
    for work in works.values():
        work()
    best = dict.fromkeys(works, float("inf"))
    for _ in range(repeats):
        for name, work in works.items():
            start = time.perf_counter()
            work()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def benchmark(
    model_path: str,
    name: str,
    structures: list[ase.Atoms],
    batch_sizes: list[int],
    repeats: int,
) -> list[list[str]]:
    """Table rows (model, workload, method, structures/s, atoms/s, speed-up)."""
    calculator = PESCalculator(ROOT / model_path, device="cpu")
    atoms_count = sum(len(atoms) for atoms in structures)
    works: dict[str, Callable[[], object]] = {
        "loop": lambda: loop(calculator, structures)
    }
    for batch_size in batch_sizes:
        works[f"evaluate {batch_size}"] = lambda b=batch_size: evaluate(
            calculator, structures, batch_size=b
        )
    timings = best_times(works, repeats)
    reference = timings["loop"]
    rows = []
    for method, seconds in timings.items():
        rows.append(
            [
                Path(model_path).stem,
                name,
                method,
                f"{len(structures) / seconds:.1f}",
                f"{atoms_count / seconds:,.0f}",
                f"{reference / seconds:.2f}×",
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument(
        "--count", type=int, default=256, help="generated 32-atom Cu cells (0: none)"
    )
    parser.add_argument(
        "--data",
        default="data/cu-emt/test.xyz",
        help="an ASE-readable file of structures ('' to skip)",
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32, 128])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    workloads = []
    if args.count:
        workloads.append((f"{args.count} × Cu32", rattled_copper(args.count)))
    if args.data:
        structures = ase.io.read(ROOT / args.data, index=":")
        for atoms in structures:
            atoms.calc = None  # the file's labels are not what is timed
        workloads.append((f"{Path(args.data).name} ({len(structures)})", structures))

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU, "
        f"best of {args.repeats} passes"
    )
    header = ["model", "structures", "method", "structures/s", "atoms/s", "vs loop"]
    rows = []
    for model in args.models:
        for name, structures in workloads:
            rows += benchmark(model, name, structures, args.batch_sizes, args.repeats)
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
