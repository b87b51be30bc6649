"""Measure the Verlet skin: ms per MD step and neighbor-list rebuilds per skin.

    python scripts/skin_scan.py [--model models/cu-emt-soap-bpnn.safetensors]
        [--atoms 256 2048] [--skins 0 0.25 0.5 1 1.5] [--steps 200] [--temperature 600]

NVE VelocityVerlet (1 fs) on rattled fcc Cu from the same initial velocities for every
skin; prints ms per step, the share of steps that rebuilt the list, and the largest
position difference from the skin-0 trajectory after the last step (the skin only
decides when to rebuild, so the trajectories must agree to rounding).
"""

from __future__ import annotations

import argparse
import time

import ase.build
import numpy as np
from ase import units
from ase.md.verlet import VelocityVerlet

from pes_calc import PESCalculator
from pes_calc.md import maxwell_boltzmann_velocities


def copper(num_atoms: int) -> ase.Atoms:
    """Rattled fcc Cu (a = 3.61 Å) with about ``num_atoms`` atoms."""
    repeats = round((num_atoms / 4) ** (1 / 3))
    atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeats)
    atoms.rattle(0.05, seed=0)
    return atoms


def run(
    model: str, atoms: ase.Atoms, skin: float, steps: int, temperature: float
) -> dict:
    atoms = atoms.copy()
    maxwell_boltzmann_velocities(atoms, temperature, np.random.default_rng(0))
    calc = PESCalculator(model, skin=skin)
    atoms.calc = calc
    dynamics = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    dynamics.run(2)  # warm-up: first calls allocate and compile
    builds, reuses = calc.neighbor_list_builds, calc.neighbor_list_reuses
    start = time.perf_counter()
    dynamics.run(steps)
    elapsed = time.perf_counter() - start
    calls = calc.neighbor_list_builds - builds + calc.neighbor_list_reuses - reuses
    return {
        "ms_per_step": 1000 * elapsed / steps,
        "rebuilds": (calc.neighbor_list_builds - builds) / max(calls, 1),
        "positions": atoms.positions.copy(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/cu-emt-soap-bpnn.safetensors")
    parser.add_argument("--atoms", type=int, nargs="+", default=[256, 2048])
    parser.add_argument(
        "--skins", type=float, nargs="+", default=[0, 0.25, 0.5, 1.0, 1.5]
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=600.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch  # after pes_calc: huge-page allocation (pes_calc/__init__.py)

    torch.set_num_threads(args.threads)

    print(
        f"{args.model}, {args.steps} NVE steps of 1 fs from {args.temperature:g} K, "
        f"{args.threads} thread(s)"
    )
    print(
        "| atoms | skin (Å) | ms/step | steps that rebuilt | max |Δr| vs skin 0 (Å) |"
    )
    print("|---|---|---|---|---|")
    for num_atoms in args.atoms:
        atoms = copper(num_atoms)
        reference = None
        for skin in sorted(args.skins):
            result = run(args.model, atoms, skin, args.steps, args.temperature)
            if reference is None:
                reference = result["positions"]
            deviation = np.abs(result["positions"] - reference).max()
            print(
                f"| {len(atoms)} | {skin:g} | {result['ms_per_step']:.1f} | "
                f"{100 * result['rebuilds']:.0f}% | {deviation:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
