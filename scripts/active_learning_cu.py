"""Active learning for copper: from ≤ 600 K data to stable, accurate MD at 1400–1800 K.

Writes the initial data (the frames of data/cu-emt/train.xyz and val.xyz that are
bulk MD at 300 and 600 K, strained, sheared, or vacancy MD at ≤ 600 K: no slabs,
no clusters, nothing hotter), then runs the loop of
``scripts/active-learning-cu.yaml`` (SOAP-BPNN, LLPR force uncertainty, EMT as
the reference; MD on the 32- and 108-atom fcc cells at 1400 and 1800 K) in
``runs/active-learning-cu/loop`` and writes ``runs/active-learning-cu/report.md``:
per round, the structures labelled, the errors on data/cu-emt/hot.xyz
(1600–2000 K, never trained on), the largest uncertainty seen in MD and the MD
steps survived before the first uncertain structure. About 10 minutes of CPU
(one torch thread; README); rerun to resume.

    python scripts/active_learning_cu.py [--config scripts/active-learning-cu.yaml]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import ase.io
import torch

from pes_calc.active import format_table, load_config, run_active_learning

ROOT = Path(__file__).resolve().parent.parent
RUN = Path("runs/active-learning-cu")
LOW_T_KINDS = ("bulk_md_300K", "bulk_md_600K", "strained", "sheared")


def is_low_temperature_bulk(atoms: ase.Atoms) -> bool:
    kind = atoms.info.get("config_type")
    return kind in LOW_T_KINDS or (
        kind == "vacancy" and atoms.info.get("temperature_K", 0) <= 600
    )


def write_initial_data(config: dict) -> None:
    for split in ("train", "val"):
        path = Path(config["data"][split])
        if path.exists():
            continue
        frames = ase.io.read(f"data/cu-emt/{split}.xyz", ":")
        kept = [atoms for atoms in frames if is_low_temperature_bulk(atoms)]
        path.parent.mkdir(parents=True, exist_ok=True)
        ase.io.write(path, kept, format="extxyz")
        print(f"{path}: {len(kept)} of the {len(frames)} structures of {split}.xyz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", type=Path, default=Path("scripts/active-learning-cu.yaml")
    )
    parser.add_argument("--outdir", type=Path, default=RUN / "loop")
    args = parser.parse_args()
    config_name = args.config.as_posix()
    args.config = args.config.resolve()
    os.chdir(ROOT)  # the config's paths are relative to the repository root
    # small models on a busy CPU: one thread is the fastest (see tests/conftest.py)
    torch.set_num_threads(1)
    config = load_config(args.config)
    write_initial_data(config)
    reports = run_active_learning(config, args.outdir)
    minutes = sum(report.wall_time_s for report in reports) / 60  # resumes included
    md, selection = config["md"], config["selection"]
    text = "\n".join(
        [
            "# Active learning for Cu (EMT reference)",
            "",
            f"`python scripts/active_learning_cu.py --config {config_name}`: "
            f"{minutes:.0f} min with one torch thread.",
            "",
            f"Initial data: {reports[0].train_size} structures at ≤ 600 K. MD: "
            f"{len(md['structures'])} cells × {md['temperatures']} K, "
            f"{md['steps']} steps of {md['timestep']} fs; uncertain means max σ_F > "
            f"{selection['max_uncertainty']} eV/Å. Test: data/cu-emt/hot.xyz "
            "(1600–2000 K). Stopped: " + str(reports[-1].stop_reason) + ".",
            "",
            format_table(reports),
            "",
        ]
    )
    (RUN / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
