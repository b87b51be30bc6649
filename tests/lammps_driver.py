"""Runs LAMMPS jobs for the tests (under mpiexec) and writes what they saw as JSON.

``python tests/lammps_driver.py JOBS.json OUT.json``: each job names the model, the
types, the commands that build the box, the `attach` keywords and the commands to
run (repeated ``repeat`` times, thermo read after each). Rank 0 writes one result
per job: energy, pressure, forces, positions and per-atom energies gathered by atom
ID, the box, and the coupling's counters.
"""

import json
import sys
from pathlib import Path

import numpy as np

from pes_calc.lammps import attach, import_lammps


def run_job(lammps, comm, job: dict) -> dict:
    lmp = lammps.lammps(
        cmdargs=["-log", "none", "-screen", "none", "-nocite"], comm=comm
    )
    try:
        lmp.commands_string(job["setup"])
        coupling = None
        if job["model"] is not None:  # None: LAMMPS alone (a pair style)
            lmp.command("fix mlip all external pf/callback 1 1")
            coupling = attach(
                lmp, job["model"], job["types"], "mlip", **job.get("attach", {})
            )
        lmp.commands_string(job.get("after_attach", ""))
        lmp.command("compute pe_atom all pe/atom")
        if job.get("per_atom_virial"):  # LAMMPS asks for the per-atom virial
            lmp.command("compute stress_atom all stress/atom NULL virial")
        lmp.command("thermo_style custom step pe etotal press vol")
        thermo = []
        for _ in range(job.get("repeat", 1)):
            lmp.commands_string(job["run"])
            thermo.append(
                {k: lmp.get_thermo(k) for k in ("pe", "etotal", "vol", "temp")}
            )
        natoms = lmp.get_natoms()

        def gathered(name: str, width: int, atom: bool = True, kind: int = 1) -> list:
            # kind 1: doubles, 0: integers
            values = (
                lmp.gather_atoms(name, kind, width)
                if atom
                else lmp.gather(name, kind, width)
            )
            return (
                np.ctypeslib.as_array(values, shape=(natoms * width,))
                .reshape(natoms, width)
                .tolist()
            )

        result = {
            "energy": lmp.get_thermo("pe"),
            "press": [lmp.extract_compute("thermo_press", 0, 1)[i] for i in range(6)],
            "nktv2p": lmp.extract_global("nktv2p"),
            "thermo": thermo,
            "forces": gathered("f", 3),
            "positions": gathered("x", 3),
            "types": [t[0] for t in gathered("type", 1, kind=0)],
            "energies": [e[0] for e in gathered("c_pe_atom", 1, atom=False)],
            "box": list(lmp.extract_box()[:6]),
            "steps": coupling.steps if coupling else 0,
            "builds": coupling.neighbor_list_builds if coupling else 0,
            "error": coupling.error if coupling else None,
            "ranks": lmp.extract_setting("world_size"),
            "procgrid": list(lmp.extract_global("procgrid")),
            "nghost": lmp.extract_setting("nghost"),
        }
        if job.get("per_atom_virial"):
            result["stress_atom"] = gathered("c_stress_atom", 6, atom=False)
        if coupling is not None and coupling.calculator.is_llpr:
            result["uncertainty"] = [
                u[0] for u in gathered("d_energy_uncertainty", 1, atom=False)
            ]
        return result
    finally:
        lmp.close()


def main(jobs_path: str, output_path: str) -> None:
    lammps = import_lammps()
    from mpi4py import MPI

    jobs = json.loads(Path(jobs_path).read_text())
    results = [run_job(lammps, MPI.COMM_WORLD, job) for job in jobs]
    if MPI.COMM_WORLD.rank == 0:
        with open(output_path, "w") as handle:
            json.dump(results, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
