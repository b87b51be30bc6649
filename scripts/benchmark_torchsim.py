"""Structures·steps per second: many MD runs at once in torch-sim (`PESModel`, one
graph per step) against one ASE calculator per structure (`PESCalculator` + ASE's
VelocityVerlet or Langevin, each structure stepped in turn), 1 thread.

    python scripts/benchmark_torchsim.py [--models models/cu-emt-soap-bpnn.safetensors
        [cu.pt2 ...]] [--counts 8 64 256] [--steps 10] [--ensembles nve nvt]
        [--json benchmarks/torchsim-cpu-1thread.json]

Structures: 32-atom fcc Cu cells (a = 3.61 Å), each strained by 1% (random, seeded)
and rattled by 0.05 Å so that they differ, with 300 K Maxwell-Boltzmann velocities;
2 fs steps; NVT is Langevin at 300 K (friction 0.01/fs on both sides). Both sides use
the same model file (an AOTInductor ``.pt2`` from ``pes-calc compile --threads 1``
works too) and dtype, a 0.5 Å Verlet skin, and `pes_calc.reuse_freed_memory`
(as the pes-calc commands do). After 2 warm-up steps, ``--steps`` steps are timed:
wall clock around the torch-sim step loop, and around all the ASE runs (the ASE
side steps every structure ``--steps`` times). The 1-minute load average is
printed with every row: other work on the machine slows both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import ase
import ase.build
import numpy as np
import torch
import torch_sim as ts
from ase import units
from ase.md.langevin import Langevin
from ase.md.verlet import VelocityVerlet

import pes_calc
from pes_calc import PESCalculator
from pes_calc.torchsim import PESModel

ROOT = Path(__file__).resolve().parents[1]
TIMESTEP_FS = 2.0
TEMPERATURE_K = 300.0
FRICTION_PER_FS = 0.01
WARMUP = 2


def copper_cells(count: int, seed: int = 0) -> list[ase.Atoms]:
    """32-atom Cu cells, each strained, rattled and given 300 K velocities."""
    rng = np.random.default_rng(seed)
    structures = []
    for _ in range(count):
        atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 2, 2)
        strain = np.eye(3) + 0.01 * rng.standard_normal((3, 3))
        atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        # Maxwell-Boltzmann momenta, amu·Å/(ASE time unit), as ASE draws them
        width = np.sqrt(atoms.get_masses() * units.kB * TEMPERATURE_K)[:, None]
        atoms.set_momenta(width * rng.standard_normal((len(atoms), 3)))
        structures.append(atoms)
    return structures


def torchsim_seconds(model: PESModel, structures, ensemble: str, steps: int) -> float:
    """Wall time of ``steps`` batched steps, after the warm-up."""
    state = ts.io.atoms_to_state(structures, model.device, model.dtype)
    scalar = {"dtype": model.dtype, "device": model.device}
    dt = torch.tensor(TIMESTEP_FS * units.fs, **scalar)
    kT = torch.tensor(TEMPERATURE_K * units.kB, **scalar)
    gamma = torch.tensor(FRICTION_PER_FS / units.fs, **scalar)
    if hasattr(ts, "nve_step"):  # torch-sim ≥ 0.4: init and step functions
        if ensemble == "nve":
            md = ts.nve_init(state, model, kT=kT)

            def step(md):
                return ts.nve_step(md, model, dt=dt)
        else:
            md = ts.nvt_langevin_init(state, model, kT=kT)

            def step(md):
                return ts.nvt_langevin_step(md, model, dt=dt, kT=kT, gamma=gamma)
    else:  # torch-sim 0.3: an (init, update) pair of closures
        if ensemble == "nve":
            init, step = ts.integrators.nve(model=model, dt=dt, kT=kT)
        else:
            init, step = ts.integrators.nvt_langevin(
                model=model, dt=dt, kT=kT, gamma=gamma, seed=0
            )
        md = init(state)
    momenta = np.concatenate([atoms.get_momenta() for atoms in structures])
    md.momenta = torch.tensor(momenta, **scalar)  # ASE's unit is torch-sim's
    for _ in range(WARMUP):
        md = step(md)
    start = time.perf_counter()
    for _ in range(steps):
        md = step(md)
    return time.perf_counter() - start


def ase_seconds(model_path: Path, structures, ensemble: str, steps: int) -> float:
    """Wall time of ``steps`` steps of every structure, one calculator each."""
    runs = []
    for atoms in structures:
        atoms = atoms.copy()
        atoms.calc = PESCalculator(model_path, device="cpu")
        if ensemble == "nve":
            dynamics = VelocityVerlet(atoms, timestep=TIMESTEP_FS * units.fs)
        else:
            dynamics = Langevin(
                atoms,
                timestep=TIMESTEP_FS * units.fs,
                temperature_K=TEMPERATURE_K,
                friction=FRICTION_PER_FS / units.fs,
                rng=np.random.default_rng(0),
            )
        dynamics.run(WARMUP)
        runs.append(dynamics)
    start = time.perf_counter()
    for dynamics in runs:
        dynamics.run(steps)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        type=Path,
        nargs="+",
        default=[ROOT / "models" / "cu-emt-soap-bpnn.safetensors"],
    )
    parser.add_argument("--counts", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--ensembles", nargs="+", default=["nve", "nvt"])
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "torchsim-cpu-1thread.json"
    )
    args = parser.parse_args()

    pes_calc.reuse_freed_memory()
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}; {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}); "
        f"{time.strftime('%Y-%m-%d %H:%M')}; {args.steps} timed steps"
    )
    print(
        "| model | ensemble | cells | atoms | torch-sim (structures·steps/s) "
        "| ASE (structures·steps/s) | torch-sim / ASE | load |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for path in args.models:
        model = PESModel(path, device="cpu")
        for ensemble in args.ensembles:
            for count in args.counts:
                rows.append(measure(model, path, ensemble, count, args.steps))
                row = rows[-1]
                print(
                    f"| {path.name} | {ensemble.upper()} | {count} | {32 * count} "
                    f"| {row['torchsim_structure_steps_per_s']:.0f} "
                    f"| {row['ase_structure_steps_per_s']:.0f} "
                    f"| {row['speedup']:.2f} | {row['load']:.2f} |",
                    flush=True,
                )
        print(
            f"{path.name}: torch-sim neighbor lists {model.neighbor_list_builds} "
            f"builds, {model.neighbor_list_reuses} reuses"
        )
    if args.json:
        summary = {
            "torch": torch.__version__,
            "threads": 1,
            "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "timestep_fs": TIMESTEP_FS,
            "rows": rows,
        }
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


def measure(model: PESModel, path: Path, ensemble: str, count: int, steps: int):
    """One row: both sides on the same ``count`` structures."""
    structures = copper_cells(count)
    batched = torchsim_seconds(model, structures, ensemble, steps)
    one_by_one = ase_seconds(path, structures, ensemble, steps)
    return {
        "model": path.name,
        "dtype": str(model.dtype),
        "ensemble": ensemble,
        "cells": count,
        "atoms": 32 * count,
        "steps": steps,
        "torchsim_structure_steps_per_s": count * steps / batched,
        "ase_structure_steps_per_s": count * steps / one_by_one,
        "speedup": one_by_one / batched,
        "load": os.getloadavg()[0],
    }


if __name__ == "__main__":
    main()
