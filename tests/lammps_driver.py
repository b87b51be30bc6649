"""Runs one LAMMPS job for the tests (under mpiexec) and writes what it saw as JSON.

python tests/lammps_driver.py JOB.json: JOB names the model, the types, the data
file, the commands before and after `fix mlip ...` and the output file.
"""

import json
import sys

import numpy as np

from pes_calc.lammps import attach, import_lammps


def main(job_path: str) -> None:
    job = json.loads(open(job_path).read())
    lammps = import_lammps()
    from mpi4py import MPI

    lmp = lammps.lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"], comm=MPI.COMM_WORLD)
    lmp.commands_string(job["setup"])
    lmp.command("fix mlip all external pf/callback 1 1")
    coupling = attach(lmp, job["model"], job["types"], "mlip", **job.get("attach", {}))
    lmp.command("compute pe_atom all pe/atom")
    lmp.command("thermo_style custom step pe press")
    lmp.commands_string(job["run"])
    natoms = lmp.get_natoms()
    forces = np.ctypeslib.as_array(lmp.gather_atoms("f", 1, 3), shape=(natoms * 3,)).reshape(natoms, 3)
    positions = np.ctypeslib.as_array(lmp.gather_atoms("x", 1, 3), shape=(natoms * 3,)).reshape(natoms, 3)
    energies = np.ctypeslib.as_array(lmp.gather("c_pe_atom", 1, 1), shape=(natoms,))
    result = {
        "energy": lmp.get_thermo("pe"),
        "press": [lmp.extract_compute("thermo_press", 0, 1)[i] for i in range(6)],
        "nktv2p": lmp.extract_global("nktv2p"),
        "volume": lmp.get_thermo("vol"),
        "forces": forces.tolist(),
        "positions": positions.tolist(),
        "energies": energies.tolist(),
        "box": list(lmp.extract_box()[:6]),
        "steps": coupling.steps,
        "builds": coupling.neighbor_list_builds,
        "error": coupling.error,
        "ranks": lmp.extract_setting("world_size"),
    }
    if coupling.calculator.is_llpr:
        result["uncertainty"] = np.ctypeslib.as_array(
            lmp.gather("d_energy_uncertainty", 1, 1), shape=(natoms,)
        ).tolist()
    if MPI.COMM_WORLD.rank == 0:
        with open(job["output"], "w") as handle:
            json.dump(result, handle)
    lmp.close()


if __name__ == "__main__":
    main(sys.argv[1])
