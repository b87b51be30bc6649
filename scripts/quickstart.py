"""Quickstart: model file → compiled TorchScript → ASE MD with PESCalculator.

Builds a SOAP-BPNN for Cu (seeded and UNTRAINED: its energies are meaningless until
the training submodule fits one; this shows the inference path), saves it as
safetensors, compiles it with ``pes-calc compile``, and runs NVE molecular dynamics
on a rattled 108-atom fcc Cu cell, printing energy conservation and ms per step.

    python scripts/quickstart.py [--steps 100] [--outdir runs/quickstart]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import ase.build
from ase import units
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet

from pes_calc import PESCalculator, build_model, save_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--outdir", type=Path, default=Path("runs/quickstart"))
    args = parser.parse_args()
    args.outdir.mkdir(parents=True, exist_ok=True)

    model_file = args.outdir / "cu-soap-bpnn.safetensors"
    compiled_file = args.outdir / "cu-soap-bpnn.pt"
    model = build_model("soap_bpnn", ["Cu"], model_dtype="float64", seed=0)
    save_model(model, model_file)
    subprocess.run(
        ["pes-calc", "compile", str(model_file), "-o", str(compiled_file)], check=True
    )
    subprocess.run(["pes-calc", "info", str(compiled_file)], check=True)

    atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True) * (3, 3, 3)
    atoms.rattle(0.05, seed=1)
    atoms.calc = PESCalculator(str(compiled_file), device="cpu")
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, force_temp=True)
    dynamics = VelocityVerlet(atoms, timestep=2.0 * units.fs)

    start_energy = atoms.get_total_energy()
    dynamics.run(5)  # warm-up: TorchScript optimises its graph on the first calls
    start = time.perf_counter()
    for block in range(args.steps // 10):
        dynamics.run(10)
        temperature = atoms.get_temperature()
        drift = (atoms.get_total_energy() - start_energy) / len(atoms)
        print(
            f"step {10 * (block + 1):5d}  T {temperature:7.1f} K  "
            f"E_pot {atoms.get_potential_energy():10.4f} eV  "
            f"drift {drift:+.2e} eV/atom",
            flush=True,
        )
    elapsed = time.perf_counter() - start
    steps = 10 * (args.steps // 10)
    print(
        f"{len(atoms)} atoms, {steps} steps: {1000 * elapsed / max(steps, 1):.1f} ms/step, "
        f"neighbour lists built {atoms.calc.neighbor_list_builds}, "
        f"reused {atoms.calc.neighbor_list_reuses}"
    )


if __name__ == "__main__":
    sys.exit(main())
