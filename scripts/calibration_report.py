"""Calibration of the shipped LLPR models, in and out of the training distribution.

    python scripts/calibration_report.py            # prints the table and writes it
                                                     # into models/README.md

For every ``models/*-llpr.safetensors`` trained on data/cu-emt, evaluates on
data/cu-emt/test.xyz (same distribution as training) and data/cu-emt/hot.xyz (MD at
1600–2000 K, hotter than any training structure): RMSE, mean predicted σ, mean
squared z-score ⟨z²⟩ (1 when calibrated, above 1 overconfident), Spearman rank
correlation of σ with |error|. Energies are per structure (total energy, eV),
forces per component and per atom (eV/Å; an atom's error and σ are the norms of
its components over √3). The last column names the targets a row misses:
E and per-atom F ⟨z²⟩ within [0.5, 2], per-atom F Spearman ≥ 0.5. Also writes
calibration plots next to the models (``*-calibration-hot.png``).
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch

from pes_calc.io import load_model
from pes_calc.train.data import LabelKeys, load_graphs
from pes_calc.train.evaluation import calibration_plot, measure_errors

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
SETS = {"test": ROOT / "data/cu-emt/test.xyz", "hot": ROOT / "data/cu-emt/hot.xyz"}
BEGIN, END = "<!-- CALIBRATION BEGIN -->", "<!-- CALIBRATION END -->"


def missed_targets(m: dict[str, float]) -> str:
    """The issue's targets this row misses: E and per-atom F ⟨z²⟩ in [0.5, 2],
    per-atom F Spearman ≥ 0.5 ("–" when all are met)."""
    missed = []
    for name, label in (("energy", "E"), ("atom_forces", "F atom")):
        if not 0.5 <= m[f"{name}_mean_squared_z"] <= 2.0:
            missed.append(f"{label} ⟨z²⟩")
    if not m["atom_forces_spearman"] >= 0.5:
        missed.append("F atom ρ")
    return ", ".join(missed) or "–"


def rows_for(path: Path) -> list[str]:
    model = load_model(path)
    dtype = next(model.parameters()).dtype
    rows = []
    for set_name, data in SETS.items():
        graphs = load_graphs(data, model.species, model.cutoff, LabelKeys(), dtype)
        start = time.perf_counter()
        evaluation = measure_errors(model, graphs, batch_size=8)
        seconds = time.perf_counter() - start
        m = evaluation.metrics()
        if set_name == "hot":
            calibration_plot(
                evaluation,
                str(path.with_name(path.stem + "-calibration-hot.png")),
                title=f"{path.stem} on hot.xyz",
            )
        rows.append(
            f"| `{path.stem}` | {set_name} | "
            f"{1000 * m['energy_per_atom_rmse']:.2f} | "
            f"{1000 * m['energy_uncertainty_mean']:.1f} | "
            f"{m['energy_mean_squared_z']:.2f} | {m['energy_spearman']:.2f} | "
            f"{1000 * m['forces_rmse']:.1f} | "
            f"{1000 * m['forces_uncertainty_mean']:.1f} | "
            f"{m['forces_mean_squared_z']:.2f} | {m['forces_spearman']:.2f} | "
            f"{m['atom_forces_mean_squared_z']:.2f} | "
            f"{m['atom_forces_spearman']:.2f} | {missed_targets(m)} |"
        )
        print(rows[-1], f"({seconds:.1f} s)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [
        "| model | set | E RMSE (meV/atom) | mean σ_E (meV) | E ⟨z²⟩ | E Spearman "
        "| F RMSE (meV/Å) | mean σ_F (meV/Å) | F ⟨z²⟩ | F Spearman "
        "| F atom ⟨z²⟩ | F atom Spearman | missed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(MODELS.glob("cu-emt-*-llpr.safetensors")):
        lines += rows_for(path)
    table = "\n".join(lines)
    readme = MODELS / "README.md"
    text = readme.read_text()
    if BEGIN in text:
        text = re.sub(f"{BEGIN}.*{END}", f"{BEGIN}\n{table}\n{END}", text, flags=re.S)
        readme.write_text(text)
        print(f"updated {readme}")


if __name__ == "__main__":
    main()
