"""Evaluate a nequip / nequip-allegro model (checkpoint or package) on extxyz sets.

Runs in the nequip venv. Loads the model through nequip's ASE calculator,
``NequIPCalculator._from_saved_model`` (eager; accepts a ``.ckpt`` from
``nequip-train`` or a ``nequip-package`` file), and reports over each file:

  energy RMSE / MAE per atom   (meV/atom)  -- of (E_pred - E_ref) / N
  force RMSE / MAE per component (meV/A)
  stress RMSE / MAE per component of the 3x3 tensor (meV/A^3), over structures
  with a finite reference stress and a cell volume (clusters skipped)

i.e. what ``pes-calc eval MODEL DATA --json`` reports for our models, plus the same
broken down by ``config_type``. ``--fd-check`` compares four force components and
sigma_xx of the first structure of the first file with central finite differences of
the energy, for steps h = 1e-3 and 1e-2 A (the model is float32: the total energy of
the 108-atom cell rounds to ~2e-6 eV, i.e. ~1 meV/A of noise at h = 1e-3 A).

Usage: python eval_nequip.py MODEL.ckpt test.xyz [hot.xyz ...] [--fd-check]
       [--json out.json]
"""

import argparse
import json
import time
import warnings
from collections import defaultdict

import ase.io
import numpy as np
import torch
from ase.stress import voigt_6_to_full_3x3_stress


def load_calculator(path: str):
    from nequip.integrations.ase import NequIPCalculator

    return NequIPCalculator._from_saved_model(path, device="cpu")


def energy_of(calc, atoms) -> float:
    b = atoms.copy()
    b.calc = calc
    return float(b.get_potential_energy())


def fd_check(calc, atoms, h: float = 1e-3) -> dict:
    a = atoms.copy()
    a.calc = calc
    forces = a.get_forces()
    worst, rows = 0.0, []
    for i, c in [(0, 0), (1, 1), (2, 2), (len(a) - 1, 0)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[i, c] += h
        minus.positions[i, c] -= h
        fd = -(energy_of(calc, plus) - energy_of(calc, minus)) / (2 * h)
        rows.append((i, c, float(forces[i, c]), fd))
        worst = max(worst, abs(fd - forces[i, c]))
    result = {"h": h, "forces": rows, "max_force_diff_meV_per_A": 1e3 * worst}
    line = f"fd-check (h = {h} A): max |F - F_fd| = {1e3 * worst:.3g} meV/A"
    if atoms.cell.volume > 0:
        sxx = float(a.get_stress(voigt=False)[0, 0])
        strained = []
        for d in (h, -h):
            b = atoms.copy()
            deformation = np.eye(3)
            deformation[0, 0] += d
            b.set_cell(b.cell @ deformation, scale_atoms=True)
            strained.append(energy_of(calc, b))
        sxx_fd = (strained[0] - strained[1]) / (2 * h) / atoms.cell.volume
        result.update(stress_xx=sxx, stress_xx_fd=sxx_fd)
        result["stress_xx_diff_meV_per_A3"] = 1e3 * abs(sxx - sxx_fd)
        line += f"; s_xx {1e3 * sxx:.4f} vs fd {1e3 * sxx_fd:.4f} meV/A^3"
    for i, c, f, fd in rows:
        line += f"\n  F[{i},{c}] = {f:+.6f}  fd {fd:+.6f} eV/A"
    print(line)
    return result


def rmse(x) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


def mae(x) -> float:
    return float(np.mean(np.abs(x)))


def evaluate(calc, path: str) -> dict:
    frames = ase.io.read(path, ":")
    de, df, ds = [], [], []
    groups = defaultdict(lambda: {"de": [], "df": [], "ds": []})
    n_atoms = 0
    t0 = time.perf_counter()
    for atoms in frames:
        ref = atoms.calc.results
        a = atoms.copy()
        a.calc = calc
        e = a.get_potential_energy()
        f = a.get_forces()
        de.append((e - ref["energy"]) / len(a))
        df.append((f - ref["forces"]).ravel())
        g = groups[atoms.info.get("config_type", "all")]
        g["de"].append(de[-1])
        g["df"].append(df[-1])
        n_atoms += len(a)
        s_ref = ref.get("stress")
        if s_ref is not None and a.cell.volume > 0 and np.all(np.isfinite(s_ref)):
            s_ref = np.asarray(s_ref)
            if s_ref.shape == (6,):
                s_ref = voigt_6_to_full_3x3_stress(s_ref)
            ds.append((a.get_stress(voigt=False) - s_ref.reshape(3, 3)).ravel())
            g["ds"].append(ds[-1])
    out = {
        "file": path,
        "n_structures": len(frames),
        "n_atoms": n_atoms,
        "energy_rmse_meV_per_atom": 1e3 * rmse(de),
        "energy_mae_meV_per_atom": 1e3 * mae(de),
        "force_rmse_meV_per_A": 1e3 * rmse(np.concatenate(df)),
        "force_mae_meV_per_A": 1e3 * mae(np.concatenate(df)),
        "n_structures_with_stress": len(ds),
        "eval_wall_s": time.perf_counter() - t0,
    }
    if ds:
        out["stress_rmse_meV_per_A3"] = 1e3 * rmse(np.concatenate(ds))
        out["stress_mae_meV_per_A3"] = 1e3 * mae(np.concatenate(ds))
    by_type = {}
    for name, g in sorted(groups.items()):
        entry = {
            "n_structures": len(g["de"]),
            "energy_rmse_meV_per_atom": 1e3 * rmse(g["de"]),
            "force_rmse_meV_per_A": 1e3 * rmse(np.concatenate(g["df"])),
        }
        if g["ds"]:
            entry["stress_rmse_meV_per_A3"] = 1e3 * rmse(np.concatenate(g["ds"]))
        by_type[name] = entry
    out["by_config_type"] = by_type
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("data", nargs="+")
    p.add_argument("--json", default=None)
    p.add_argument("--fd-check", action="store_true")
    p.add_argument(
        "--fd-h",
        type=float,
        nargs="+",
        default=[1e-3, 1e-2],
        help="finite-difference steps (A); float32 energies round to ~1e-6 eV, "
        "so the smallest step is dominated by rounding",
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    calc = load_calculator(args.model)
    model = calc.model
    result = {
        "model": args.model,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "dtype": str(next(model.parameters()).dtype),
        "sets": {},
    }
    if args.fd_check:
        first = ase.io.read(args.data[0], 0)
        result["fd_check"] = [fd_check(calc, first, h) for h in args.fd_h]
    for path in args.data:
        out = evaluate(calc, path)
        result["sets"][path] = out
        print(path)
        for k, v in out.items():
            if k not in ("by_config_type", "file"):
                print(
                    f"  {k:28s} {v:.6g}" if isinstance(v, float) else f"  {k:28s} {v}"
                )
        for name, entry in out["by_config_type"].items():
            print(
                f"    {name:16s} "
                + "  ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in entry.items()
                )
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
