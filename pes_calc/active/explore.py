"""A round's MD stage: one run per (start structure, temperature) with the round's
LLPR model, each watched for uncertain structures (``round-NNN/md/``), and all
recorded structures together in ``candidates.xyz``."""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ase

from pes_calc.active.candidates import candidate
from pes_calc.active.config import structure_files
from pes_calc.active.xyz import read_xyz, write_xyz
from pes_calc.calculator import PESCalculator
from pes_calc.files import atomic_write_text
from pes_calc.md import UNCERTAINTY_MEASURES, StopMD, UncertaintyWatch, run_md
from pes_calc.train import read_structures

__all__ = ["Exploration", "clean_run"]


def clean_run(run: dict[str, Any]) -> bool:
    """An MD run (its summary) that ran to the end without an uncertain structure."""
    return run["first_uncertain_step"] is None and run["stop_reason"] is None


class Exploration:
    """The MD runs of round ``round_`` (``config`` normalised, files under
    ``round_dir``; progress lines through ``say``); a run whose summary is on
    disk is not run again."""

    def __init__(
        self,
        config: dict[str, Any],
        round_dir: Path,
        round_: int,
        say: Callable[[str], None],
    ):
        self.config, self.dir, self.round, self.say = config, round_dir, round_, say

    def run(self) -> list[dict[str, Any]]:
        """Every (start structure, temperature) run's summary; candidates.xyz at
        the end."""
        md_dir = self.dir / "md"
        md_dir.mkdir(exist_ok=True)
        runs, candidates = [], []
        for index, (name, atoms, temperature) in enumerate(self.md_runs()):
            summary_path = md_dir / f"{name}.json"
            if not summary_path.exists():
                self.md_run(md_dir, name, atoms, temperature, index)
            runs.append(json.loads(summary_path.read_text()))
            candidates += read_xyz(md_dir / f"{name}.xyz")
        if not (self.dir / "candidates.xyz").exists():
            for number, atoms in enumerate(candidates):
                atoms.info["candidate_index"] = number
            write_xyz(self.dir / "candidates.xyz", candidates)
        return runs

    def md_runs(self) -> Iterator[tuple[str, ase.Atoms, float]]:
        """(name, structure, temperature in K) for every start frame and
        temperature."""
        for path in structure_files(self.config["md"]["structures"]):
            frames = read_structures(path)
            for (number, atoms), temperature in itertools.product(
                enumerate(frames), self.config["md"]["temperatures"]
            ):
                stem = Path(path).stem + (f"-{number}" if len(frames) > 1 else "")
                yield f"{stem}-{temperature:g}K", atoms, temperature

    def md_run(
        self, md_dir: Path, name: str, atoms: ase.Atoms, temperature: float, index: int
    ) -> None:
        """Run ``name`` (the ``index``-th of the round, at ``temperature`` K):
        ``NAME.log``, ``NAME-uncertainty.csv``, its candidates in ``NAME.xyz``
        and, last (it marks the run done), its summary ``NAME.json``."""
        md, selection = self.config["md"], self.config["selection"]
        device = None if self.config["device"] == "auto" else self.config["device"]
        watch = UncertaintyWatch(
            selection["max_uncertainty"],
            measure=selection["measure"],
            on_uncertain="record",
            log=md_dir / f"{name}-uncertainty.csv",
            interval=md["interval"],
        )
        observers: list[Any] = [
            watch,
            (_StopAbove(watch, md["stop_uncertainty"]), md["interval"]),
        ]
        model = self.dir / "llpr" / "model.safetensors"
        start, error = time.perf_counter(), None
        try:
            summary = run_md(
                PESCalculator(model, device=device),
                atoms.copy(),
                ensemble=md["ensemble"],
                temperature=temperature,
                steps=md["steps"],
                timestep=md["timestep"],
                thermostat=md["thermostat"],
                friction=md["friction"],
                log=md_dir / f"{name}.log",
                log_interval=md["log_interval"],
                progress=False,
                observers=observers,
                seed=self.config["seed"] + 1000 * self.round + index,
            )
        except (ValueError, FloatingPointError) as caught:  # e.g. atoms blown apart
            summary, error = None, f"{type(caught).__name__}: {caught}"
        finally:
            watch.close()
        if summary is not None:
            steps = summary.steps
        else:  # the last step checked before the failure
            steps = watch.history[-1][0] if watch.history else 0
        first = watch.first_exceeded_step
        run = {
            "name": name,
            "temperature_K": temperature,
            "steps": steps,
            "requested_steps": md["steps"],
            "first_uncertain_step": first,
            "steps_survived": steps if first is None else first,
            "max_uncertainty": _finite_or_none(watch.max_seen),
            "candidates": len(watch.recorded),
            "stop_reason": summary.stop_reason if summary else error,
            "wall_time_s": round(time.perf_counter() - start, 2),
        }
        write_xyz(
            md_dir / f"{name}.xyz",
            [candidate(a, name, temperature, self.round) for a in watch.recorded],
        )
        atomic_write_text(md_dir / f"{name}.json", json.dumps(run, indent=1))
        unit = UNCERTAINTY_MEASURES[selection["measure"]]
        over = "never over" if first is None else f"first over at step {first},"
        self.say(
            f"md {name}: {steps}/{md['steps']} steps, max σ "
            f"{watch.max_seen:.3g} {unit}, {over} {len(watch.recorded)} recorded"
            + (f", stopped: {run['stop_reason']}" if run["stop_reason"] else "")
            + f" ({run['wall_time_s']:.0f} s)"
        )


class _StopAbove:
    """Ends a run after the watch's latest check measured a non-finite value or
    more than ``limit`` (if given): past it the model is far outside its data."""

    def __init__(self, watch: UncertaintyWatch, limit: float | None):
        self.watch, self.limit = watch, math.inf if limit is None else float(limit)

    def __call__(self, dynamics: Any) -> None:
        if not self.watch.history or self.watch.history[-1][0] != dynamics.nsteps:
            return
        step, energy_sigma, force_sigma = self.watch.history[-1]
        value = {
            "forces": force_sigma,
            "energy": energy_sigma,
            "energy_per_atom": energy_sigma / len(dynamics.atoms),
        }[self.watch.measure]
        if not math.isfinite(value):
            raise StopMD(f"non-finite uncertainty at step {step}")
        if value > self.limit:
            raise StopMD(
                f"uncertainty {value:.4g} over stop_uncertainty "
                f"{self.limit:g} at step {step}"
            )


def _finite_or_none(value: float) -> float | None:
    """``value``, or None (JSON's null) for inf or nan."""
    return float(value) if math.isfinite(value) else None
