"""Short-range vs long-range SOAP-BPNN on data/dimers-gfn2: errors and decay tables.

    python scripts/long_range_report.py [--plot models/dimers-gfn2-long-range-scan.png]

For the test dimers, split at a 5 Å closest intermolecular distance (the SOAP cutoff:
beyond it the short-range model sees two isolated molecules), it prints the RMSE of
total energies and of interaction energies E_int = E(AB) - E(A) - E(B), each model
against GFN2-xTB, with E(A), E(B) of the monomers from the same method (the
reference's stored with each frame, ``monomer_energy``, else from tblite). The
separated dimers are also split into LiF-LiF and the rest: LiF-LiF's GFN2
interaction is not that of fixed charges (models/README.md). For the rigid scans
of scan.xyz it prints E_int against the closest distance. Energies in meV.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import ase.io  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pes_calc import keys, load_model  # noqa: E402
from pes_calc.neighbors import atoms_to_graph  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "dimers-gfn2"
MODELS = {
    "short-range": ROOT / "models" / "dimers-gfn2-soap-bpnn.safetensors",
    "long-range": ROOT / "models" / "dimers-gfn2-soap-bpnn-lr.safetensors",
}
CUTOFF = 5.0  # Å, both models' SOAP cutoff
SCAN_GAPS = (3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 15.0)


def model_energy(model, atoms: ase.Atoms) -> float:
    """Energy (eV) of one structure, float64."""
    graph = atoms_to_graph(atoms, model.species, model.cutoff)
    return float(model(graph, False, False)[keys.ENERGY].detach().sum())


def reference_energy(atoms: ase.Atoms) -> float:
    """GFN2-xTB energy (eV) of a structure, as data/dimers-gfn2 was labelled."""
    from tblite.ase import TBLite

    atoms = atoms.copy()
    atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
    return float(atoms.get_potential_energy())


def monomer_energy(atoms: ase.Atoms) -> float:
    """GFN2-xTB E(A) + E(B) (eV): stored with the frame (rigid monomers), else
    computed."""
    if "monomer_energy" in atoms.info:
        return float(atoms.info["monomer_energy"])
    return sum(reference_energy(m) for m in monomers(atoms))


def monomers(atoms: ase.Atoms) -> tuple[ase.Atoms, ase.Atoms]:
    split = int(atoms.info["monomer_atoms"])
    return atoms[:split], atoms[split:]


def rmse(values: list[float]) -> float:
    return float(np.sqrt(np.mean(np.square(values)))) if values else float("nan")


def test_table(models: dict) -> str:
    frames = ase.io.read(DATA / "test.xyz", ":")
    rows = {}

    def separated(f):
        return f.info["gap"] > CUTOFF

    def lif_lif(f):
        return f.info["config_type"] == "LiF-LiF"

    for label, select in (
        (f"contact (gap < {CUTOFF:g} Å)", lambda f: not separated(f)),
        (f"separated (gap > {CUTOFF:g} Å)", separated),
        ("separated, without LiF-LiF", lambda f: separated(f) and not lif_lif(f)),
        ("separated, LiF-LiF only", lambda f: separated(f) and lif_lif(f)),
    ):
        chosen = [f for f in frames if select(f)]
        reference_int = [f.get_potential_energy() - monomer_energy(f) for f in chosen]
        rows[label] = {"n": len(chosen), "int_rms": 1000 * rmse(reference_int)}
        for name, model in models.items():
            total, interaction = [], []
            for frame, ref_int in zip(chosen, reference_int, strict=True):
                energy = model_energy(model, frame)
                total.append(energy - frame.get_potential_energy())
                pred_int = energy - sum(model_energy(model, m) for m in monomers(frame))
                interaction.append(pred_int - ref_int)
            rows[label][name] = (1000 * rmse(total), 1000 * rmse(interaction))
    names = list(models)
    lines = [
        "| test dimers | n | RMS E_int (GFN2) | "
        + " | ".join(f"{n}: E | {n}: E_int" for n in names)
        + " |",
        "|---|---|---|" + "---|---|" * len(names),
    ]
    for label, row in rows.items():
        cells = " | ".join(f"{row[n][0]:.1f} | {row[n][1]:.1f}" for n in names)
        lines.append(f"| {label} | {row['n']} | {row['int_rms']:.1f} | {cells} |")
    return "\n".join(lines)


def scan_curves(models: dict) -> dict:
    """pair → (gaps, {"GFN2-xTB": E_int, model name: E_int}) in meV."""
    frames = ase.io.read(DATA / "scan.xyz", ":")
    curves: dict = {}
    for frame in frames:
        pair = frame.info["config_type"]
        gaps, values = curves.setdefault(pair, ([], {}))
        gaps.append(frame.info["gap"])
        reference = frame.get_potential_energy() - frame.info["monomer_energy"]
        values.setdefault("GFN2-xTB", []).append(1000 * reference)
        for name, model in models.items():
            separate = sum(model_energy(model, m) for m in monomers(frame))
            values.setdefault(name, []).append(
                1000 * (model_energy(model, frame) - separate)
            )
    return curves


def scan_table(curves: dict) -> str:
    lines = [
        "| pair | E_int (meV) | " + " | ".join(f"{g:g} Å" for g in SCAN_GAPS) + " |",
        "|---|---|" + "---|" * len(SCAN_GAPS),
    ]
    for pair, (gaps, values) in curves.items():
        index = [int(np.argmin(np.abs(np.array(gaps) - g))) for g in SCAN_GAPS]
        for name, curve in values.items():
            cells = " | ".join(f"{curve[i]:.1f}" for i in index)
            lines.append(f"| {pair} | {name} | {cells} |")
    return "\n".join(lines)


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.4))
    styles = {"GFN2-xTB": "k-", "short-range": "C0--", "long-range": "C3-."}
    for axis, (pair, (gaps, values)) in zip(axes, curves.items(), strict=True):
        for name, curve in values.items():
            axis.plot(gaps, curve, styles.get(name, "-"), label=name)
        axis.axvline(CUTOFF, color="0.7", lw=0.8)
        axis.set_title(pair)
        axis.set_xlabel("closest intermolecular distance (Å)")
        axis.set_ylim(*_limits(values))
    axes[0].set_ylabel("E_int (meV)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def _limits(values: dict) -> tuple[float, float]:
    """y-range of the tail (gap ≥ 4 Å) of the reference, with room for the models."""
    reference = np.array(values["GFN2-xTB"])
    tail = reference[len(reference) // 6 :]
    span = max(abs(tail.min()), abs(tail.max()), 5.0)
    return -1.5 * span, 1.5 * span


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", type=Path, help="E_int vs distance figure (png)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = {name: load_model(path).to(torch.float64) for name, path in MODELS.items()}
    print(test_table(models))
    print()
    curves = scan_curves(models)
    print(scan_table(curves))
    if args.plot:
        plot(curves, args.plot)


if __name__ == "__main__":
    main()
