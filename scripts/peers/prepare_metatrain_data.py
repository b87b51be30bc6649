"""Copy extxyz files for metatrain, giving structures without a stress a NaN stress.

metatrain (2026.4.1) reads the stress of an ASE file all-or-nothing: if a single
structure lacks the ``stress`` key, it logs "No stress found in section 'energy'" and
drops stress for the *whole* file (and training then fails if another set still has
stress).  NaN targets, however, are masked out of metatrain's losses and metrics, so
a structure whose stress is NaN is trained and evaluated on energy and forces only.

Usage:  python prepare_metatrain_data.py IN.xyz OUT.xyz [IN2.xyz OUT2.xyz ...]
"""

import sys

import ase.io
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator


def prepare(src: str, dst: str) -> None:
    frames = ase.io.read(src, ":")
    out, n_nan = [], 0
    for atoms in frames:
        results = dict(atoms.calc.results) if atoms.calc is not None else {}
        # values may also live in info/arrays instead of the calculator
        if "energy" not in results and "energy" in atoms.info:
            results["energy"] = atoms.info.pop("energy")
        if "forces" not in results and "forces" in atoms.arrays:
            results["forces"] = atoms.arrays.pop("forces")
        if "stress" not in results and "stress" in atoms.info:
            results["stress"] = atoms.info.pop("stress")
        if "stress" not in results:
            results["stress"] = np.full(6, np.nan)
            n_nan += 1
        new = atoms.copy()
        new.calc = SinglePointCalculator(
            new, **{k: results[k] for k in ("energy", "forces", "stress")}
        )
        out.append(new)
    ase.io.write(dst, out, format="extxyz")
    # round-trip check: every frame must come back with a stress
    back = ase.io.read(dst, ":")
    assert all("stress" in a.calc.results for a in back), "stress lost on write"
    print(f"{src} -> {dst}: {len(out)} structures, {n_nan} given NaN stress")


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or len(args) % 2:
        sys.exit(__doc__)
    for src, dst in zip(args[::2], args[1::2], strict=True):
        prepare(src, dst)
