"""Quickstart: a shipped, trained model → an AOTInductor package → ASE MD.

Compiles ``models/cu-emt-soap-bpnn.safetensors`` (SOAP-BPNN trained on data/cu-emt,
copper labelled with ASE's EMT) into a ``.pt2`` package with ``pes-calc compile``
(about a minute the first time; cached after that), runs NVT molecular
dynamics at 600 K on the 108-atom fcc cell in ``data/cu-emt/structures/`` with
`PESCalculator`, then checks the last frame against the reference EMT calculator.

    python scripts/quickstart.py [--steps 500] [--temperature 600] \\
        [--outdir runs/quickstart]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import torch
from ase.calculators.emt import EMT

from pes_calc import PESCalculator, reuse_freed_memory
from pes_calc.md import run_md

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "cu-emt-soap-bpnn.safetensors"
STRUCTURE = ROOT / "data" / "cu-emt" / "structures" / "cu-fcc-108.xyz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=600.0, help="K")
    parser.add_argument("--outdir", type=Path, default=Path("runs/quickstart"))
    args = parser.parse_args()
    args.outdir.mkdir(parents=True, exist_ok=True)

    # one thread: 108 atoms gain nothing from a second (README, "Threads"), and a
    # package runs fastest with the thread count it was compiled for
    torch.set_num_threads(1)
    reuse_freed_memory()  # what every pes-calc command does (README, "Memory")
    compiled = args.outdir / "cu-emt-soap-bpnn.pt2"
    subprocess.run(
        ["pes-calc", "compile", str(MODEL), "-o", str(compiled), "--threads", "1"],
        check=True,
    )
    subprocess.run(["pes-calc", "info", str(compiled)], check=True)

    atoms = ase.io.read(STRUCTURE)
    summary = run_md(
        PESCalculator(str(compiled), device="cpu"),
        atoms,
        ensemble="nvt",
        temperature=args.temperature,
        steps=args.steps,
        timestep=2.0,
        trajectory=args.outdir / "md.traj",
        log=args.outdir / "md.log",
        seed=0,
    )
    print(summary)

    # how close is the model to its reference on a configuration it made itself?
    predicted_forces = atoms.get_forces()
    predicted_energy = atoms.get_potential_energy()
    reference = atoms.copy()
    reference.calc = EMT()
    force_error = np.sqrt(np.mean((predicted_forces - reference.get_forces()) ** 2))
    energy_error = (predicted_energy - reference.get_potential_energy()) / len(atoms)
    print(
        f"last frame vs EMT: energy error {1000 * energy_error:+.2f} meV/atom, "
        f"force RMSE {1000 * force_error:.1f} meV/Å "
        "(force scale "
        f"{1000 * np.sqrt(np.mean(reference.get_forces() ** 2)):.0f} meV/Å)"
    )
    print(f"trajectory: {args.outdir / 'md.traj'}, log: {args.outdir / 'md.log'}")


if __name__ == "__main__":
    sys.exit(main())
