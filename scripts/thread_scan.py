"""ms per MD step of `pes-calc md` (and seconds per training epoch of `pes-calc
train`) at 1 thread and at every core, on a quiet machine and with one busy process
beside it, by system size.

    python scripts/thread_scan.py [--sizes 32 256 2048 16384] [--json FILE]

The busy process is a Python loop (what another user's job, a second rank or a
background compile looks like to the scheduler). Each configuration is a fresh
`pes-calc` process; the 1-minute load average is printed with every row.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ase.build
import ase.io

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "cu-emt-soap-bpnn.safetensors"
STEPS = {32: 100, 108: 60, 256: 40, 2048: 10, 16384: 3}


def md_ms_per_step(structure: Path, steps: int, threads: int) -> float:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pes_calc.cli",
            "md",
            str(MODEL),
            str(structure),
            "--steps",
            str(steps),
            "--threads",
            str(threads),
            "--quiet",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(re.search(r"\(([0-9.]+) ms/step\)", done.stdout).group(1))


def epoch_seconds(directory: Path, threads: int) -> float:
    config = (ROOT / "models" / "cu-emt-soap-bpnn.yaml").read_text()
    config = re.sub(r"num_epochs: *\d+", "num_epochs: 2", config)
    (directory / "train.yaml").write_text(config)
    outdir = directory / f"train-{threads}-{time.time_ns()}"
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pes_calc.cli",
            "train",
            str(directory / "train.yaml"),
            "-o",
            str(outdir),
            "--quiet",
            "--threads",
            str(threads),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return (time.perf_counter() - start) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 256, 2048, 16384])
    parser.add_argument("--no-training", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    rows = []
    print(f"{cores} cores; {time.strftime('%Y-%m-%d %H:%M')}; model {MODEL.name}")
    print("| what | atoms | machine | 1 thread | all threads | all / 1 | load |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        for machine in ("quiet", "one busy process"):
            busy = None
            if machine != "quiet":
                busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(2)
            try:
                for atoms_count in args.sizes:
                    repeat = round((atoms_count / 4) ** (1 / 3))
                    atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True).repeat(
                        (repeat,) * 3
                    )
                    atoms.rattle(0.05, seed=0)
                    path = directory / f"cu{atoms_count}.xyz"
                    ase.io.write(path, atoms)
                    steps = STEPS.get(atoms_count, 5)
                    one, every = (md_ms_per_step(path, steps, t) for t in (1, cores))
                    row = {
                        "what": "md ms/step",
                        "atoms": atoms_count,
                        "machine": machine,
                        "one": one,
                        "all": every,
                        "load": os.getloadavg()[0],
                    }
                    rows.append(row)
                    print(
                        f"| md (ms/step) | {atoms_count} | {machine} | {one:.1f} | "
                        f"{every:.1f} | "
                        f"{every / one:.2f} | {row['load']:.2f} |",
                        flush=True,
                    )
                if not args.no_training:
                    one, every = (epoch_seconds(directory, t) for t in (1, cores))
                    rows.append(
                        {
                            "what": "train s/epoch",
                            "atoms": "cu-emt",
                            "machine": machine,
                            "one": one,
                            "all": every,
                            "load": os.getloadavg()[0],
                        }
                    )
                    print(
                        f"| train (s/epoch) | data/cu-emt | {machine} | {one:.1f} | "
                        f"{every:.1f} | "
                        f"{every / one:.2f} | {os.getloadavg()[0]:.2f} |",
                        flush=True,
                    )
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
    if args.json:
        args.json.write_text(json.dumps({"cores": cores, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
