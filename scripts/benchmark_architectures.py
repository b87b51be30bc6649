"""ms per energy+forces+stress call of each architecture through PESCalculator.

System: periodic fcc Cu, a = 3.61 Å, rattled (0.05 Å), 256 atoms by default; models
at realistic sizes, cutoff 5 Å, float32, untrained (timing does not depend on the
weights): SOAP-BPNN with metatrain's defaults; NequIP l_max 2, 4 layers, 32 features;
Allegro l_max 2, 2 layers, 64 scalar / 16 tensor features, MLPs 1×128.

Each call follows a small random move of every atom (as in MD, so the Verlet-skin
neighbour list is mostly reused); the median over --calls calls is printed, after
--warmup calls. Threads: torch's default unless --threads is given.

    python scripts/benchmark_architectures.py [--atoms 256] [--calls 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import ase.build
import numpy as np
import torch

from pes_calc import PESCalculator, build_model
from pes_calc.compile import compile_model

MODELS = {
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


def copper(num_atoms: int) -> ase.Atoms:
    """A rattled fcc Cu cell with about ``num_atoms`` atoms (4 n³)."""
    repeat = max(1, round((num_atoms / 4) ** (1 / 3)))
    atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True) * ((repeat,) * 3)
    atoms.rattle(0.05, seed=0)
    return atoms


def time_calls(calculator: PESCalculator, atoms: ase.Atoms, calls: int, warmup: int) -> list[float]:
    """Wall-clock ms of each energy+forces+stress call after a small move."""
    atoms = atoms.copy()
    atoms.calc = calculator
    rng = np.random.default_rng(1)
    times = []
    for call in range(warmup + calls):
        atoms.positions += rng.normal(0.0, 0.002, atoms.positions.shape)
        start = time.perf_counter()
        atoms.get_potential_energy()
        atoms.get_forces()
        atoms.get_stress()
        if call >= warmup:
            times.append(1000 * (time.perf_counter() - start))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--atoms", type=int, default=256)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    atoms = copper(args.atoms)
    print(f"{len(atoms)} Cu atoms, float32, {torch.get_num_threads()} threads, device cpu")
    print(f"{'model':<10} {'artefact':<12} {'ms/call':>9} {'±':>7} {'parameters':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, hypers in MODELS.items():
            model = build_model(name, ["Cu"], seed=0, **hypers)
            parameters = sum(p.numel() for p in model.parameters())
            compiled = Path(tmp) / f"{name}.pt"
            compile_model(model, compiled)
            for artefact, source in (("eager", model), ("torchscript", str(compiled))):
                calculator = PESCalculator(source, device="cpu")
                times = time_calls(calculator, atoms, args.calls, args.warmup)
                spread = statistics.stdev(times) if len(times) > 1 else 0.0
                print(
                    f"{name:<10} {artefact:<12} {statistics.median(times):9.1f} "
                    f"{spread:7.1f} {parameters:11d}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
