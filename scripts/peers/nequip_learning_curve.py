"""Per-epoch validation RMSEs of a nequip-train run, from its CSV log, in pes_calc's
units (meV/atom, meV/Å, meV/Å³), as a markdown table.

Usage: python nequip_learning_curve.py RUN/csv/version_0/metrics.csv [--every N]
       [--timer RUN/train.log]
"""

import argparse
import csv
import re
from pathlib import Path


def main():
    p = argparse.ArgumentParser()
    p.add_argument("metrics")
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--timer", default=None, help="train.log with WallTimer lines")
    args = p.parse_args()
    rows = {}
    lr = {}
    with open(args.metrics) as fh:
        for row in csv.DictReader(fh):
            if row.get("lr-Adam"):
                lr[int(row["step"])] = float(row["lr-Adam"])
            if row.get("val0_epoch/forces_rmse"):
                rows[int(row["epoch"])] = row
    seconds = {}
    if args.timer:
        for line in Path(args.timer).read_text().splitlines():
            m = re.search(r"\[timer\] epoch (\d+) trained in ([\d.]+) s", line)
            if m:
                seconds[int(m.group(1))] = float(m.group(2))
    print(
        "| epoch | lr | val E (meV/atom) | val F (meV/Å) | val σ (meV/Å³) | train s |"
    )
    print("|---|---|---|---|---|---|")
    epochs = sorted(rows)
    for epoch in epochs:
        if (epoch + 1) % args.every and epoch != epochs[-1]:
            continue
        row = rows[epoch]
        step = int(row["step"])
        # the learning rate logged at the start of this epoch
        rate = max((s for s in lr if s <= step), default=None)
        print(
            f"| {epoch + 1} | {lr[rate]:.2e} | "
            f"{1e3 * float(row['val0_epoch/per_atom_energy_rmse']):.2f} | "
            f"{1e3 * float(row['val0_epoch/forces_rmse']):.1f} | "
            f"{1e3 * float(row['val0_epoch/stress_rmse']):.3f} | "
            f"{seconds.get(epoch, float('nan')):.0f} |"
            if rate is not None
            else f"| {epoch + 1} | – | – | – | – | – |"
        )


if __name__ == "__main__":
    main()
