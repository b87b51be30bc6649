"""ms per MD step: `pes-calc lammps` (fix external, 1 thread per rank) against the ASE
path (`PESCalculator` + VelocityVerlet, 1 thread), fcc copper at 300 K, NVE.

    python scripts/benchmark_lammps.py [--model models/cu-emt-soap-bpnn.safetensors]
        [--sizes 256 2048 16384] [--ranks 1 2] [--steps 20] [--json FILE]

Each configuration runs its own process (mpiexec for LAMMPS), warms up for 3 steps,
then times ``--steps`` steps: LAMMPS's "Loop time" over the steps, and the wall
time of ``dynamics.run`` for ASE. Both sides use the same model file and dtype.
The 1-minute load average is printed with every row: on a 2-core machine, 2 ranks
leave no core for anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LATTICE = 3.61

ASE_JOB = """
import sys, time, json
import torch
torch.set_num_threads(1)
import ase.build, ase.units
from ase.md.verlet import VelocityVerlet
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from pes_calc import PESCalculator
repeat, steps, model = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
atoms = ase.build.bulk("Cu", "fcc", a={lattice}, cubic=True).repeat((repeat,) * 3)
import numpy
MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=numpy.random.default_rng(0))
atoms.calc = PESCalculator(model, device="cpu")
dynamics = VelocityVerlet(atoms, timestep=1.0 * ase.units.fs)
dynamics.run(3)
start = time.perf_counter()
dynamics.run(steps)
print(json.dumps({{"ms_per_step": 1000 * (time.perf_counter() - start) / steps}}))
"""

LAMMPS_INPUT = """units metal
atom_style atomic
boundary p p p
lattice fcc {lattice}
region box block 0 {repeat} 0 {repeat} 0 {repeat}
create_box 1 box
create_atoms 1 box
mass 1 63.546
velocity all create 300.0 4928459 mom yes rot yes dist gaussian
neighbor 1.0 bin
fix mlip all external pf/callback 1 1
fix nve all nve
timestep 0.001
thermo 1000
run 3
run {steps}
"""


def load_average() -> float:
    return os.getloadavg()[0]


def ase_ms_per_step(repeat: int, steps: int, model: Path) -> float:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            ASE_JOB.format(lattice=LATTICE),
            str(repeat),
            str(steps),
            str(model),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])["ms_per_step"]


def lammps_ms_per_step(repeat: int, steps: int, model: Path, ranks: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        (directory / "in.bench").write_text(
            LAMMPS_INPUT.format(lattice=LATTICE, repeat=repeat, steps=steps)
        )
        mpiexec = shutil.which(
            "mpiexec",
            path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        )
        done = subprocess.run(
            [
                mpiexec,
                "-n",
                str(ranks),
                sys.executable,
                "-m",
                "pes_calc.cli",
                "lammps",
                "in.bench",
                "--model",
                str(model),
                "--types",
                "Cu",
                "--threads",
                "1",
                "--quiet",
                "--log",
                "log.lammps",
            ],
            cwd=directory,
            capture_output=True,
            text=True,
            env={**os.environ, "HYDRA_IFACE": "lo", "OMP_NUM_THREADS": "1"},
        )
        if done.returncode != 0:
            raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
        log = (directory / "log.lammps").read_text()
    loops = re.findall(
        r"Loop time of ([0-9.eE+-]+) on (\d+) procs for (\d+) steps", log
    )
    seconds, _, counted = loops[-1]  # the timed run, after the warm-up run
    ghosts = re.findall(r"Nghost:\s+([0-9.]+) ave", log)
    return {
        "ms_per_step": 1000 * float(seconds) / int(counted),
        "ghosts_per_rank": float(ghosts[-1]) if ghosts else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", type=Path, default=ROOT / "models" / "cu-emt-soap-bpnn.safetensors"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 2048, 16384])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--scaling-sizes",
        type=int,
        nargs="+",
        default=[16384],
        help="sizes run on every --ranks count (others on 1 rank)",
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    rows = []
    print(
        f"model {args.model.name}; torch {torch.__version__}; {os.cpu_count()} CPUs; "
        f"{time.strftime('%Y-%m-%d %H:%M')}"
    )
    print(
        "| atoms | ASE (ms/step) | ranks | LAMMPS (ms/step) | LAMMPS / ASE "
        "| speed-up over 1 rank | ghosts per rank | load |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for atoms in args.sizes:
        repeat = round((atoms / 4) ** (1 / 3))
        assert 4 * repeat**3 == atoms, f"{atoms} is not 4 n³"
        steps = max(3, args.steps if atoms <= 2048 else args.steps // 4)
        ase_ms = ase_ms_per_step(repeat, steps, args.model)
        one_rank = None
        for ranks in args.ranks if atoms in args.scaling_sizes else [1]:
            result = lammps_ms_per_step(repeat, steps, args.model, ranks)
            one_rank = one_rank or result["ms_per_step"]
            row = {
                "atoms": atoms,
                "steps": steps,
                "ase_ms_per_step": ase_ms,
                "ranks": ranks,
                "lammps_ms_per_step": result["ms_per_step"],
                "ratio_to_ase": result["ms_per_step"] / ase_ms,
                "speedup_over_one_rank": one_rank / result["ms_per_step"],
                "ghosts_per_rank": result["ghosts_per_rank"],
                "load": load_average(),
            }
            rows.append(row)
            print(
                f"| {atoms} | {ase_ms:.1f} | {ranks} "
                f"| {row['lammps_ms_per_step']:.1f} | "
                f"{row['ratio_to_ase']:.3f} | {row['speedup_over_one_rank']:.2f} | "
                f"{row['ghosts_per_rank']:.0f} | {row['load']:.2f} |",
                flush=True,
            )
    if args.json:
        args.json.write_text(
            json.dumps({"model": str(args.model.name), "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
