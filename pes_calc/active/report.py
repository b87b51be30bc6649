"""What a loop reports: `RoundReport` per round (``report.json``) and the tables
of all rounds (``report.csv``, ``report.md``, `format_table`)."""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from pes_calc.files import atomic_write, atomic_write_text
from pes_calc.md import UNCERTAINTY_MEASURES

__all__ = ["RoundReport", "format_table", "write_tables"]


@dataclass
class RoundReport:
    """The figures of one round (``round-{r:03d}/report.json``).

    ``train_size`` structures trained the round's model; its LLPR wrapper scored
    ``test_metrics`` on data.test (eV units; empty without a test set) and ran
    ``md_runs`` MD runs, ``md_runs_clean`` of them never over the threshold.
    ``md_steps_survived`` is the sum over runs of the steps before the first
    uncertain check (all steps run when none), out of ``md_steps_requested``;
    ``md_steps_survived_min`` its smallest per-run value. ``max_uncertainty`` is
    the largest value of the measure seen. ``labelled`` structures (of
    ``candidates`` recorded; ``label_failures`` failed) join the next round's
    training set. ``stop_reason`` is None when the loop goes on.
    """

    round: int
    train_size: int
    candidates: int
    labelled: int
    label_failures: int
    md_runs: int
    md_runs_clean: int
    md_steps_survived: int
    md_steps_survived_min: int
    md_steps_requested: int
    max_uncertainty: float
    uncertainty_measure: str
    wall_time_s: float
    stop_reason: str | None
    test_metrics: dict[str, float] = field(default_factory=dict)


def _milli(metrics: dict[str, float], name: str) -> str:
    return f"{1000 * metrics[name]:.2f}" if name in metrics else "–"


def _plain(metrics: dict[str, float], name: str) -> str:
    return f"{metrics[name]:.3g}" if name in metrics else "–"


_COLUMNS = (  # header, the cell of a report
    ("round", lambda r: str(r.round)),
    ("train", lambda r: str(r.train_size)),
    ("labelled", lambda r: str(r.labelled)),
    ("test E (meV/atom)", lambda r: _milli(r.test_metrics, "energy_per_atom_rmse")),
    ("test F (meV/Å)", lambda r: _milli(r.test_metrics, "forces_rmse")),
    ("test F ⟨z²⟩", lambda r: _plain(r.test_metrics, "forces_mean_squared_z")),
    ("max σ ({unit})", lambda r: f"{r.max_uncertainty:.3g}"),
    ("steps survived: min", lambda r: str(r.md_steps_survived_min)),
    ("all", lambda r: f"{100 * r.md_steps_survived / r.md_steps_requested:.0f}%"),
    ("clean runs", lambda r: f"{r.md_runs_clean}/{r.md_runs}"),
    ("time (s)", lambda r: f"{r.wall_time_s:.0f}"),
)


def format_table(reports: list[RoundReport]) -> str:
    """A markdown table, one row per round: RMSEs and mean squared z-score of the
    forces on data.test, the largest uncertainty seen in MD, the MD steps before
    the first uncertain structure (the smallest per run, and the share of all
    requested steps), and the runs that never went over the threshold."""
    unit = UNCERTAINTY_MEASURES[reports[0].uncertainty_measure] if reports else ""
    rows = [
        [header.format(unit=unit) for header, _ in _COLUMNS],
        ["---"] * len(_COLUMNS),
    ]
    rows += [[cell(report) for _, cell in _COLUMNS] for report in reports]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def write_tables(outdir: Path, reports: list[RoundReport]) -> None:
    """``outdir/report.csv`` (every field, one ``test_*`` column per metric) and
    ``outdir/report.md`` (`format_table`), one row per round of ``reports``."""
    names = [f.name for f in fields(RoundReport) if f.name != "test_metrics"]
    metrics = sorted({name for report in reports for name in report.test_metrics})

    def write(temporary: str) -> None:
        with open(temporary, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(names + [f"test_{name}" for name in metrics])
            for report in reports:
                row = asdict(report)
                writer.writerow(
                    [row[n] for n in names]
                    + [report.test_metrics.get(m, "") for m in metrics]
                )

    atomic_write(outdir / "report.csv", write)
    atomic_write_text(outdir / "report.md", format_table(reports) + "\n")
