"""What LLPR uncertainties cost: ms per energy+forces+stress call with and without them.

For each architecture (realistic sizes, the models of benchmark_architectures.py,
float32, TorchScript) on periodic fcc Cu (256 atoms by default) with 16 ensemble
members, three calculators are timed:

- ``plain``: the model alone;
- ``llpr``: + energy_uncertainty, energies_uncertainty and energy_ensemble (no
  extra backward pass; the default of `PESCalculator`);
- ``llpr+forces``: + forces_ensemble and forces_uncertainty, which need
  min(M, F) extra backward passes (M members, F last-layer features).

The overhead column is relative to ``plain``. The LLPR is fitted on a few
EMT-labelled cells; timing does not depend on its numbers.

    python scripts/benchmark_llpr.py [--atoms 256] [--members 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from benchmark_architectures import MODELS, copper, time_calls

from pes_calc import PESCalculator, build_model
from pes_calc.compile import compile_model
from pes_calc.train.data import LabelKeys, extract_labels, labelled_graphs
from pes_calc.train.llpr import wrap


def labelled_cells(count: int, seed: int) -> list:
    cells = []
    for index in range(count):
        atoms = copper(32)
        atoms.rattle(0.1, seed=seed + index)
        atoms.calc = EMT()
        labels = {
            "energy": atoms.get_potential_energy(),
            "forces": atoms.get_forces(),
            "stress": atoms.get_stress(),
        }
        atoms.calc = SinglePointCalculator(atoms, **labels)
        cells.append(atoms)
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--atoms", type=int, default=256)
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--architectures", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    atoms = copper(args.atoms)
    print(
        f"{len(atoms)} atoms, {args.members} members, {torch.get_num_threads()} threads"
    )
    print(
        "| architecture | F | plain (ms) | llpr (ms) | overhead "
        "| llpr+forces (ms) | overhead |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.architectures:
            hypers = MODELS[name]
            # NequIP/Allegro need a neighbor normalisation; about 43 within 5 Å in fcc
            # Cu
            extra = {} if name == "soap_bpnn" else {"avg_num_neighbors": 43.0}
            model = build_model(name, ["Cu"], **hypers, **extra, seed=0)
            structures = labelled_cells(6, seed=1)
            graphs = labelled_graphs(
                structures,
                extract_labels(structures, LabelKeys()),
                model.species,
                model.cutoff,
            )
            llpr = wrap(model, args.members, graphs[:4], graphs[4:])
            timings = {}
            for label, source in (
                ("plain", model),
                ("llpr", llpr),
                ("llpr+forces", llpr),
            ):
                path = Path(folder) / f"{name}-{label}.pt"
                compile_model(source, path)
                calculator = PESCalculator(
                    path, device="cpu", ensemble_forces=label == "llpr+forces"
                )
                times = time_calls(calculator, atoms, args.calls, args.warmup)
                timings[label] = statistics.median(times)
            plain = timings["plain"]
            print(
                f"| {name} | {llpr.num_features} | {plain:.1f} | "
                f"{timings['llpr']:.1f} | "
                f"{100 * (timings['llpr'] / plain - 1):+.0f}% | "
                f"{timings['llpr+forces']:.1f} | "
                f"{100 * (timings['llpr+forces'] / plain - 1):+.0f}% |",
                flush=True,
            )


if __name__ == "__main__":
    main()
