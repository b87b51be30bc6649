"""The loop: `run_active_learning` runs (or resumes) round after round; each
round's stages (train, LLPR, MD, select and label, report) are skipped when
their output is on disk."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import ase
import ase.io
import yaml

from pes_calc.active.candidates import label_structure, select
from pes_calc.active.config import (
    ActiveLearningConfigError,
    base_config,
    llpr_config,
    normalise,
    reference_factory,
)
from pes_calc.active.explore import Exploration, clean_run
from pes_calc.active.report import RoundReport, write_tables
from pes_calc.active.xyz import read_xyz, write_xyz
from pes_calc.files import atomic_write_text
from pes_calc.train import LabelKeys, read_structures, train

__all__ = ["run_active_learning"]

_Result = TypeVar("_Result")


def run_active_learning(
    config: Mapping[str, Any], outdir: str | os.PathLike, *, progress: bool = True
) -> list[RoundReport]:
    """Run (or resume) the loop ``config`` describes in ``outdir``; one report per
    round, also written to ``outdir/report.csv`` and ``report.md``.

    Examples
    --------
    >>> config = load_config("active-learning.yaml")  # doctest: +SKIP
    >>> reports = run_active_learning(config, "runs/al")  # doctest: +SKIP
    >>> print(format_table(reports))  # doctest: +SKIP
    """
    config = normalise(config)
    outdir = Path(outdir)
    _claim(outdir, config)
    kwargs = config["reference"]["kwargs"]
    try:
        reference = reference_factory(config["reference"]["calculator"])(**kwargs)
    except TypeError as error:
        raise ActiveLearningConfigError(f"reference.kwargs {kwargs}: {error}") from None
    reports: list[RoundReport] = []
    for round_ in range(config["budget"]["max_rounds"]):
        labels_so_far = sum(report.labelled for report in reports)
        report = _Round(config, outdir, round_, progress).run(reference, labels_so_far)
        reports.append(report)
        write_tables(outdir, reports)
        if report.stop_reason is not None:
            break
    return reports


def _claim(outdir: Path, config: dict[str, Any]) -> None:
    """Write ``config.yaml``, or check a rerun's config against it (budget aside)."""
    path = outdir / "config.yaml"
    if path.exists():
        previous = yaml.safe_load(path.read_text())
        if {**previous, "budget": None} != {**config, "budget": None}:
            raise ActiveLearningConfigError(
                f"{outdir} holds a loop with a different config (only budget may "
                "change on a rerun); use another output directory"
            )
    outdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))


class _Round:
    """One round's stages; each is skipped when its output is on disk."""

    def __init__(
        self, config: dict[str, Any], outdir: Path, round_: int, progress: bool
    ):
        self.config, self.round, self.progress = config, round_, progress
        self.outdir = outdir
        self.dir = outdir / f"round-{round_:03d}"
        self.dir.mkdir(parents=True, exist_ok=True)
        state = self.dir / "state.json"
        self.state = json.loads(state.read_text()) if state.exists() else {"times": {}}

    def say(self, message: str) -> None:
        if self.progress:
            print(f"[round {self.round}] {message}", flush=True)

    def save(self) -> None:
        atomic_write_text(self.dir / "state.json", json.dumps(self.state, indent=1))

    def timed(self, stage: str, work: Callable[[], _Result]) -> _Result:
        """``work()``, its wall time (s) added to the stage's in state.json."""
        start = time.perf_counter()
        result = work()
        times = self.state["times"]
        times[stage] = times.get(stage, 0.0) + time.perf_counter() - start
        self.save()
        return result

    def run(self, reference: Any, labels_so_far: int) -> RoundReport:
        train_file = self.dir / "train.xyz"
        if not train_file.exists():
            self.timed("data", lambda: self.write_training_set(train_file))
        train_size = len(read_structures(train_file))
        if "llpr_model" not in self.state:
            self.say(f"training on {train_size} structures ({train_file})")
            self.timed("train", lambda: self.train_models(train_file))
        explore = Exploration(self.config, self.dir, self.round, self.say).run
        md_done = (self.dir / "candidates.xyz").exists()
        runs = explore() if md_done else self.timed("md", explore)
        candidates = read_xyz(self.dir / "candidates.xyz")
        labelled, stop_reason = self.label_stage(
            runs, candidates, reference, labels_so_far
        )
        report = self.report(train_size, runs, candidates, labelled, stop_reason)
        text = json.dumps(asdict(report), indent=1)
        atomic_write_text(self.dir / "report.json", text)
        return report

    def label_stage(
        self,
        runs: list[dict[str, Any]],
        candidates: list[ase.Atoms],
        reference: Any,
        labels_so_far: int,
    ) -> tuple[list[ase.Atoms], str | None]:
        """(labelled structures, why the loop stops or None): candidates are
        selected and labelled unless the MD was clean or the budget is spent."""
        selection, budget = self.config["selection"], self.config["budget"]
        last = self.round + 1 >= budget["max_rounds"]
        max_labels = budget["max_labels"]
        labelled_file = self.dir / "labelled.xyz"
        if labelled_file.exists():  # labelled by an earlier run: never again
            labelled = read_xyz(labelled_file)
        elif all(clean_run(run) for run in runs):
            return [], "converged"
        elif last:
            return [], "max_rounds"
        elif max_labels is not None and labels_so_far >= max_labels:
            return [], "max_labels"
        else:
            if "selected" not in self.state:  # fixed once chosen
                cap = selection["max_per_round"]
                if max_labels is not None:
                    cap = min(cap, max_labels - labels_so_far)
                self.state["selected"] = select(candidates, cap, selection)
                self.save()
            chosen = [candidates[i] for i in self.state["selected"]]
            self.say(f"labelling {len(chosen)} of {len(candidates)} candidates")
            labelled = self.timed("label", lambda: self.label(chosen, reference))
        if not labelled:
            return [], "nothing labelled"
        return labelled, "max_rounds" if last else None

    def write_training_set(self, path: Path) -> None:
        if self.round == 0:
            structures = read_structures(self.config["data"]["train"])
        else:
            previous = self.outdir / f"round-{self.round - 1:03d}"
            structures = read_xyz(previous / "train.xyz") + read_xyz(
                previous / "labelled.xyz"
            )
        write_xyz(path, structures)

    def train_models(self, train_file: Path) -> None:
        previous = self.outdir / f"round-{self.round - 1:03d}/base/model.safetensors"
        base = train(
            base_config(self.config, self.round, train_file, previous),
            self.dir / "base",
            progress=self.progress,
        )
        self.say("LLPR: covariance, calibration and ensemble")
        llpr = train(
            llpr_config(self.config, train_file, base.model_path),
            self.dir / "llpr",
            progress=self.progress,
        )
        self.state.update(
            base_model=str(base.model_path),
            llpr_model=str(llpr.model_path),
            val_metrics=base.val_metrics,
            test_metrics=llpr.test_metrics,
        )

    def label(self, chosen: list[ase.Atoms], reference: Any) -> list[ase.Atoms]:
        """Reference labels for ``chosen``, appended one by one to
        labelled.partial.xyz (kept across interruptions), then labelled.xyz."""
        partial = self.dir / "labelled.partial.xyz"
        kept = _complete_frames(partial)
        write_xyz(partial, kept)  # without a frame cut off by an interruption
        done = {atoms.info["candidate_index"]: atoms for atoms in kept}
        label_keys = LabelKeys.from_config(self.config["data"])
        failures = self.state.setdefault("label_failures", {})
        with open(partial, "a") as handle:
            for atoms in chosen:
                index = atoms.info["candidate_index"]
                if index in done:
                    continue
                try:
                    structure = label_structure(atoms, reference, label_keys)
                except Exception as error:  # a reference failure skips one structure
                    failures[str(index)] = why = f"{type(error).__name__}: {error}"
                    self.say(f"labelling candidate {index} failed ({why})")
                    continue
                failures.pop(str(index), None)
                frame = io.StringIO()
                ase.io.write(frame, structure, format="extxyz")
                handle.write(frame.getvalue())  # one write: a whole frame or none
                handle.flush()
                done[index] = structure
        labelled = [
            done[a.info["candidate_index"]]
            for a in chosen
            if a.info["candidate_index"] in done
        ]
        write_xyz(self.dir / "labelled.xyz", labelled)
        partial.unlink()
        return labelled

    def report(
        self,
        train_size: int,
        runs: list[dict[str, Any]],
        candidates: list,
        labelled: list,
        stop_reason: str | None,
    ) -> RoundReport:
        survived = [run["steps_survived"] for run in runs]
        largest = [run["max_uncertainty"] for run in runs]
        return RoundReport(
            round=self.round,
            train_size=train_size,
            candidates=len(candidates),
            labelled=len(labelled),
            label_failures=len(self.state.get("label_failures", {})),
            md_runs=len(runs),
            md_runs_clean=sum(clean_run(run) for run in runs),
            md_steps_survived=sum(survived),
            md_steps_survived_min=min(survived),
            md_steps_requested=sum(run["requested_steps"] for run in runs),
            max_uncertainty=math.inf if None in largest else max(largest),
            uncertainty_measure=self.config["selection"]["measure"],
            wall_time_s=round(sum(self.state["times"].values()), 1),
            stop_reason=stop_reason,
            test_metrics=self.state["test_metrics"],
        )


def _complete_frames(path: Path) -> list[ase.Atoms]:
    """The frames of an extxyz file up to one that is cut off (or unreadable)."""
    frames: list[ase.Atoms] = []
    if path.exists():
        with contextlib.suppress(Exception):  # ASE raises many kinds on a cut frame
            frames.extend(ase.io.iread(path, format="extxyz"))
    return frames
