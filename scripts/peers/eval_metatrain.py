"""Evaluate an exported metatrain model (model.pt) on an extxyz test set.

Reports, over the structures of the test file:
  energy RMSE / MAE per atom   (meV/atom)  -- RMSE of (E_pred - E_ref)/N
  force RMSE / MAE per component (meV/A)
  stress RMSE / MAE per component (meV/A^3 and GPa), over structures that carry a
  finite reference stress and have a cell volume (bulk and slabs; clusters skipped).
  For slabs (pbc T,T,F) the stress is dE/dstrain / cell volume, vacuum included,
  the same definition as the EMT labels.
and the same broken down by ``config_type`` (atoms.info) when present.

Uses metatomic-ase's MetatomicCalculator (conservative forces/stress from autograd),
independently of metatrain's own logging, so the numbers are in the same units as
pes_calc's own test metrics.  ``--fd-check`` compares forces and one stress component
of the first test structure against central finite differences.

Usage: python eval_metatrain.py model.pt test.xyz [--extensions-directory DIR]
       [--json out.json]
"""

import argparse
import json
import time
import warnings
from collections import defaultdict

import ase.io
import ase.units
import numpy as np

# REQUIRED: sphericart registers the autograd (backward) formulas of its spherical
# harmonics from Python.  An exported metatrain SOAP-BPNN loaded with only the
# extension's shared library silently loses the angular part of its forces and stress
# (checked against finite differences; `mtt eval` 2026.4.1 is affected too).
import sphericart.torch  # noqa: F401,E402
import torch
from metatomic_ase import MetatomicCalculator  # noqa: E402


def fd_check(calc, atoms, h=1e-4):
    a = atoms.copy()
    a.calc = calc
    f = a.get_forces()

    def energy(b):
        b.calc = calc
        return b.get_potential_energy()

    worst = 0.0
    for i, c in [(0, 0), (1, 1), (2, 2), (len(a) - 1, 0)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[i, c] += h
        minus.positions[i, c] -= h
        fd = -(energy(plus) - energy(minus)) / (2 * h)
        worst = max(worst, abs(fd - f[i, c]))
    line = f"fd-check: max |F - F_fd| = {1e3 * worst:.3g} meV/A"
    if a.cell.volume > 0:
        s = a.get_stress(voigt=False)[0, 0]
        strained = []
        for d in (h, -h):
            b = atoms.copy()
            deformation = np.eye(3)
            deformation[0, 0] += d
            b.set_cell(b.cell @ deformation, scale_atoms=True)
            strained.append(energy(b))
        s_fd = (strained[0] - strained[1]) / (2 * h) / atoms.cell.volume
        line += f"; |s_xx - s_fd| = {1e3 * abs(s - s_fd):.3g} meV/A^3"
    print(line)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("test")
    p.add_argument("--extensions-directory", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--fd-check", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)

    frames = ase.io.read(args.test, ":")
    calc = MetatomicCalculator(
        args.model, extensions_directory=args.extensions_directory, device="cpu"
    )
    if args.fd_check:
        fd_check(calc, frames[0])
    de, df, ds = [], [], []
    groups = defaultdict(lambda: {"de": [], "df": [], "ds": []})
    n_atoms = 0
    warnings.filterwarnings("ignore", message="stress requested but likely")
    t0 = time.perf_counter()
    for atoms in frames:
        ref = atoms.calc.results
        e_ref, f_ref = ref["energy"], ref["forces"]
        s_ref = ref.get("stress")
        a = atoms.copy()
        a.calc = calc
        e = a.get_potential_energy()
        f = a.get_forces()
        de.append((e - e_ref) / len(a))
        df.append((f - f_ref).ravel())
        g = groups[atoms.info.get("config_type", "all")]
        g["de"].append(de[-1])
        g["df"].append(df[-1])
        n_atoms += len(a)
        if s_ref is not None and a.cell.volume > 0 and np.all(np.isfinite(s_ref)):
            s = a.get_stress(voigt=False)
            s_ref = np.asarray(s_ref)
            if s_ref.shape == (6,):
                from ase.stress import voigt_6_to_full_3x3_stress

                s_ref = voigt_6_to_full_3x3_stress(s_ref)
            ds.append((s - s_ref.reshape(3, 3)).ravel())
            g["ds"].append(ds[-1])
    wall = time.perf_counter() - t0
    de = np.array(de)
    df = np.concatenate(df)

    def rmse(x):
        return float(np.sqrt(np.mean(np.square(x))))

    def mae(x):
        return float(np.mean(np.abs(x)))

    out = {
        "n_structures": len(frames),
        "n_atoms": n_atoms,
        "energy_rmse_meV_per_atom": 1e3 * rmse(de),
        "energy_mae_meV_per_atom": 1e3 * mae(de),
        "force_rmse_meV_per_A": 1e3 * rmse(df),
        "force_mae_meV_per_A": 1e3 * mae(df),
        "n_structures_with_stress": len(ds),
        "eval_wall_s": wall,
    }
    if ds:
        ds = np.concatenate(ds)
        out.update(
            {
                "stress_rmse_meV_per_A3": 1e3 * rmse(ds),
                "stress_mae_meV_per_A3": 1e3 * mae(ds),
                "stress_rmse_GPa": rmse(ds) / ase.units.GPa,
                "stress_mae_GPa": mae(ds) / ase.units.GPa,
            }
        )
    by_type = {}
    for name, g in sorted(groups.items()):
        entry = {
            "n_structures": len(g["de"]),
            "energy_rmse_meV_per_atom": 1e3 * rmse(np.array(g["de"])),
            "force_rmse_meV_per_A": 1e3 * rmse(np.concatenate(g["df"])),
        }
        if g["ds"]:
            entry["stress_rmse_meV_per_A3"] = 1e3 * rmse(np.concatenate(g["ds"]))
        by_type[name] = entry
    for k, v in out.items():
        print(f"{k:28s} {v:.6g}" if isinstance(v, float) else f"{k:28s} {v}")
    print("by config_type:")
    for name, entry in by_type.items():
        print(
            f"  {name:20s} "
            + "  ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in entry.items()
            )
        )
    out["by_config_type"] = by_type
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
