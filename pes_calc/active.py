"""Uncertainty-triggered active learning: `run_active_learning`, `load_config`,
`RoundReport` (``pes-calc active-learn CONFIG.yaml -o OUTDIR``).

Each round trains a model, wraps it in LLPR, runs MD with it, and labels the
structures it was unsure about with a reference ASE calculator::

    train.xyz ─train─> base/ ─llpr─> llpr/ ─MD per (structure, T)─> candidates
        ▲                                                                 │
        └─ next round's train.xyz = train.xyz + labelled.xyz <─ label <─ select

until one round's MD stays below the threshold in every run ("converged") or the
budget is spent ("max_rounds", "max_labels"; "nothing labelled" when a round
found candidates but none could be labelled). The last round only trains, runs
MD and reports: labels nobody trains on are not made.

Config: a ``pes-calc train`` config (``seed``, ``device``, ``data``,
``architecture``) plus six sections; the defaults below are filled in
(`DEFAULTS`), unknown keys are errors::

    data: {train: ..., val: ..., test: ...}  # initial labelled data; val calibrates
                                             # LLPR; test (optional) is scored per round
    architecture: {name: soap_bpnn, model: {...}, training: {...}}
    reference: {calculator: "ase.calculators.emt:EMT", kwargs: {}}   # module:Class
    retrain: {mode: finetune, training: {}}  # or scratch; training: overrides of
                                             # architecture.training for rounds ≥ 1
    llpr: {model: {num_ensemble_members: {energy: 8}}, training: {}}  # the llpr
                                             # architecture's sections
    md: {structures: [FILE or GLOB, ...], temperatures: [K, ...], steps: 1000,
         timestep: 1.0, ensemble: nvt, interval: 10, stop_uncertainty: null, ...}
    selection: {max_uncertainty: X, measure: forces, max_per_round: 20,
                max_per_run: null, min_separation_steps: 50, duplicate_tolerance: 0.01}
    budget: {max_rounds: 5, max_labels: null}

Every frame of every ``md.structures`` file starts one run per temperature; an
`UncertaintyWatch` checks it every ``interval`` steps and records the structures
over ``selection.max_uncertainty``; a run ends early only on a non-finite value
or one over ``md.stop_uncertainty`` (the model is lost there). Selection
takes the most uncertain candidates first and skips one within
``min_separation_steps`` of a chosen one of the same run, or whose fingerprint
(every atom's 12 nearest-neighbour distances, sorted) is within
``duplicate_tolerance`` Å RMS of a chosen one (e.g. the same start structure
recorded at step 0 at two temperatures).

On disk (``OUTDIR/round-{r:03d}/``), in the order written:

=================  ==========================================================
``train.xyz``      this round's training set: data.train, then the previous
                   round's train.xyz + labelled.xyz
``base/``          the ``pes-calc train`` run (resumes from its checkpoint)
``llpr/``          the llpr run wrapping base/model.safetensors
``md/``            per run NAME: ``NAME.log`` (MD), ``NAME-uncertainty.csv``,
                   ``NAME.xyz`` (its candidates), ``NAME.json`` (its summary)
``candidates.xyz`` all uncertain structures, with the model's predictions under
                   ``model_energy``/``model_forces`` (never labels)
``labelled.xyz``   the selected ones with the reference's energy, forces, stress
                   under data's keys (``labelled.partial.xyz`` while labelling)
``report.json``    the round's figures (`RoundReport`)
=================  ==========================================================

plus ``state.json`` (finished stages), and ``OUTDIR/config.yaml``, ``report.csv``
and ``report.md`` (one row per round). Resuming: a rerun skips every stage whose
output exists, so finished rounds are not recomputed, training resumes from the
trainer's checkpoint, and labels on disk are never made again; only ``budget``
may differ from the config of the first run (raise max_rounds to go on).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import glob
import importlib
import io
import itertools
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import ase
import ase.io
import numpy as np

from pes_calc.md import ENSEMBLES, UNCERTAINTY_MEASURES, StopMD, UncertaintyWatch
from pes_calc.train.data import LabelKeys, read_structures
from pes_calc.train.trainer import TrainingConfigError, normalise_config, train

DEFAULTS: dict[str, dict[str, Any]] = {
    "reference": {"calculator": None, "kwargs": {}},
    "retrain": {"mode": "finetune", "training": {}},
    "llpr": {"model": {"num_ensemble_members": {"energy": 8}}, "training": {}},
    "md": {"structures": None, "temperatures": None, "steps": 1000, "timestep": 1.0,
           "ensemble": "nvt", "interval": 10, "thermostat": "langevin",
           "friction": 0.01, "log_interval": 10, "stop_uncertainty": None},
    "selection": {"max_uncertainty": None, "measure": "forces", "max_per_round": 20,
                  "max_per_run": None, "min_separation_steps": 50,
                  "duplicate_tolerance": 0.01},
    "budget": {"max_rounds": 5, "max_labels": None},
}
TRAINING_KEYS = ("seed", "device", "data", "architecture")
RETRAIN_MODES = ("finetune", "scratch")
# fingerprint of a structure: each atom's nearest-neighbour distances, sorted
FINGERPRINT_NEIGHBOURS, FINGERPRINT_CUTOFF = 12, 6.0


class ActiveLearningConfigError(TrainingConfigError):
    """An active-learning config that cannot be run as written."""


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


# ------------------------------------------------------------------- config


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """The YAML config at ``path``; relative paths in it are read from the current
    directory, as for ``pes-calc train``."""
    import yaml

    with open(path) as handle:
        config = yaml.safe_load(handle)
    if not isinstance(config, dict):
        raise ActiveLearningConfigError(f"{path} is not a YAML mapping")
    return config


def normalise(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with `DEFAULTS` filled in and checked; unknown keys are errors."""
    config = copy.deepcopy(dict(config))
    known = set(TRAINING_KEYS) | set(DEFAULTS)
    _check_keys(config, known, "top-level")
    if isinstance(config.get("retrain"), str):
        config["retrain"] = {"mode": config["retrain"]}
    out: dict[str, Any] = {"seed": int(config.get("seed", 0)),
                           "device": str(config.get("device", "cpu"))}
    for name in ("data", "architecture"):
        if not isinstance(config.get(name), Mapping):
            raise ActiveLearningConfigError(f"the config needs a {name!r} section")
        out[name] = dict(config[name])
    for name, defaults in DEFAULTS.items():
        given = config.get(name) or {}
        if not isinstance(given, Mapping):
            raise ActiveLearningConfigError(f"{name} must be a mapping, got {given!r}")
        _check_keys(given, defaults, name)
        out[name] = {**copy.deepcopy(defaults), **copy.deepcopy(dict(given))}
    _check(out)
    return json.loads(json.dumps(out))  # plain lists and dicts, as YAML writes them


def _check_keys(given: Mapping[str, Any], known: Any, where: str) -> None:
    unknown = set(given) - set(known)
    if unknown:
        raise ActiveLearningConfigError(
            f"unknown {where} keys {sorted(unknown)}; known: {', '.join(sorted(known))}"
        )


# values that must be > 0: (section, key, an integer?, may be null?)
_POSITIVE = (
    ("md", "steps", True, False), ("md", "interval", True, False),
    ("md", "log_interval", True, False), ("md", "timestep", False, False),
    ("md", "stop_uncertainty", False, True),
    ("selection", "max_uncertainty", False, False),
    ("selection", "max_per_round", True, False),
    ("selection", "max_per_run", True, True),
    ("selection", "min_separation_steps", True, False),
    ("budget", "max_rounds", True, False), ("budget", "max_labels", True, True),
)


def _check(config: dict[str, Any]) -> None:
    """Errors now rather than after hours of training."""
    md, selection = config["md"], config["selection"]
    reference_factory(config["reference"]["calculator"])
    if config["retrain"]["mode"] not in RETRAIN_MODES:
        raise ActiveLearningConfigError(f"retrain.mode must be one of {RETRAIN_MODES}")
    # the trainer's own checks, on the configs it will get
    for where, trainer_config in (
        ("", _base_config(config, 0, "train.xyz", "base.safetensors")),
        ("retrain: ", _base_config(config, 1, "train.xyz", "base.safetensors")),
        ("llpr: ", _llpr_config(config, "train.xyz", "base.safetensors")),
    ):
        try:
            normalise_config(trainer_config)
        except TrainingConfigError as error:
            raise ActiveLearningConfigError(f"{where}{error}") from None
    for section, key, integer, nullable in _POSITIVE:
        value = config[section][key]
        kinds = (int,) if integer else (int, float)
        if (value is None and nullable) or (
            isinstance(value, kinds) and not isinstance(value, bool) and value > 0
        ):
            continue
        raise ActiveLearningConfigError(
            f"{section}.{key} must be {'an integer' if integer else 'a number'} > 0"
            f"{' or null' if nullable else ''}, got {value!r}")
    if selection["measure"] not in UNCERTAINTY_MEASURES:
        raise ActiveLearningConfigError(
            f"selection.measure must be one of {tuple(UNCERTAINTY_MEASURES)}")
    members = config["llpr"]["model"].get("num_ensemble_members", {}).get("energy", 0)
    if selection["measure"] == "forces" and not members:
        raise ActiveLearningConfigError(
            "selection.measure forces needs llpr.model.num_ensemble_members.energy"
            " ≥ 1")
    if md["ensemble"] not in ENSEMBLES:
        raise ActiveLearningConfigError(f"md.ensemble must be one of {ENSEMBLES}")
    temperatures = md["temperatures"]
    if not isinstance(temperatures, list) or not temperatures or not all(
        _is_number(t) and t >= 0 for t in temperatures
    ):
        raise ActiveLearningConfigError("md.temperatures must be a list of K ≥ 0")
    if not isinstance(md["structures"], list) or not md["structures"]:
        raise ActiveLearningConfigError("md.structures must be a list of files")
    _structure_files(md["structures"])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def reference_factory(spec: Any) -> Any:
    """The class (or function) ``"package.module:Name"`` (or ``"...module.Name"``).

    >>> reference_factory("ase.calculators.emt:EMT")
    <class 'ase.calculators.emt.EMT'>
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ActiveLearningConfigError(
            "reference.calculator must name an ASE calculator class, e.g. "
            "'ase.calculators.emt:EMT' or 'tblite.ase:TBLite'")
    module_name, _, name = spec.partition(":") if ":" in spec else spec.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ActiveLearningConfigError(
            f"reference.calculator {spec!r}: cannot import {module_name!r} ({error}); "
            "install the package that provides it") from error
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ActiveLearningConfigError(
            f"reference.calculator {spec!r}: module {module_name} has no class "
            f"{name!r}")
    return factory


def _structure_files(patterns: list[str]) -> list[str]:
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(pattern)))
        if not matches:
            raise ActiveLearningConfigError(f"md.structures: no file matches {pattern}")
        files += matches
    return files


def _base_config(config, round_: int, train_file, previous_model) -> dict[str, Any]:
    """The ``pes-calc train`` config of round ``round_`` (no test set: the LLPR
    wrapper of the same model is the one scored)."""
    section = copy.deepcopy(config["architecture"])
    training = dict(section.get("training") or {})
    if round_ > 0:
        training.update(config["retrain"]["training"])
        if config["retrain"]["mode"] == "finetune":
            training["finetune"] = {"read_from": str(previous_model)}
    section["training"] = training
    data = {k: v for k, v in config["data"].items() if k != "test"}
    return {"seed": config["seed"], "device": config["device"],
            "data": {**data, "train": str(train_file)}, "architecture": section}


def _llpr_config(config, train_file, base_model) -> dict[str, Any]:
    llpr = copy.deepcopy(config["llpr"])
    llpr["training"]["model_checkpoint"] = str(base_model)
    return {"seed": config["seed"], "device": config["device"],
            "data": {**config["data"], "train": str(train_file)},
            "architecture": {"name": "llpr", **llpr}}


# --------------------------------------------------------------------- loop


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
        _write_tables(outdir, reports)
        if report.stop_reason is not None:
            break
    return reports


def _claim(outdir: Path, config: dict[str, Any]) -> None:
    """Write ``config.yaml``, or check a rerun's config against it (budget aside)."""
    import yaml

    path = outdir / "config.yaml"
    if path.exists():
        previous = yaml.safe_load(path.read_text())
        if {**previous, "budget": None} != {**config, "budget": None}:
            raise ActiveLearningConfigError(
                f"{outdir} holds a loop with a different config (only budget may "
                "change on a rerun); use another output directory")
    outdir.mkdir(parents=True, exist_ok=True)
    _atomic_text(path, yaml.safe_dump(config, sort_keys=False))


class _Round:
    """One round's stages; each is skipped when its output is on disk."""

    def __init__(self, config: dict[str, Any], outdir: Path, round_: int,
                 progress: bool):
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
        _atomic_text(self.dir / "state.json", json.dumps(self.state, indent=1))

    def timed(self, stage: str, work):
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
        md_done = (self.dir / "candidates.xyz").exists()
        runs = self.run_md() if md_done else self.timed("md", self.run_md)
        candidates = _read_xyz(self.dir / "candidates.xyz")
        labelled, stop_reason = self.label_stage(runs, candidates, reference,
                                                 labels_so_far)
        report = self.report(train_size, runs, candidates, labelled, stop_reason)
        _atomic_text(self.dir / "report.json", json.dumps(asdict(report), indent=1))
        return report

    def label_stage(self, runs: list[dict[str, Any]], candidates: list[ase.Atoms],
                    reference: Any, labels_so_far: int
                    ) -> tuple[list[ase.Atoms], str | None]:
        """(labelled structures, why the loop stops or None): candidates are
        selected and labelled unless the MD was clean or the budget is spent."""
        selection, budget = self.config["selection"], self.config["budget"]
        last = self.round + 1 >= budget["max_rounds"]
        max_labels = budget["max_labels"]
        labelled_file = self.dir / "labelled.xyz"
        if labelled_file.exists():  # labelled by an earlier run: never again
            labelled = _read_xyz(labelled_file)
        elif all(_clean(run) for run in runs):
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
            structures = (_read_xyz(previous / "train.xyz")
                          + _read_xyz(previous / "labelled.xyz"))
        _atomic_xyz(path, structures)

    def train_models(self, train_file: Path) -> None:
        previous = self.outdir / f"round-{self.round - 1:03d}/base/model.safetensors"
        base = train(_base_config(self.config, self.round, train_file, previous),
                     self.dir / "base", progress=self.progress)
        self.say("LLPR: covariance, calibration and ensemble")
        llpr = train(_llpr_config(self.config, train_file, base.model_path),
                     self.dir / "llpr", progress=self.progress)
        self.state.update(
            base_model=str(base.model_path), llpr_model=str(llpr.model_path),
            val_metrics=base.val_metrics, test_metrics=llpr.test_metrics)

    def run_md(self) -> list[dict[str, Any]]:
        """Every (start structure, temperature) run; candidates.xyz at the end."""
        md_dir = self.dir / "md"
        md_dir.mkdir(exist_ok=True)
        runs, candidates = [], []
        for index, (name, atoms, temperature) in enumerate(self.md_runs()):
            summary_path = md_dir / f"{name}.json"
            if not summary_path.exists():
                self.md_run(md_dir, name, atoms, temperature, index)
            runs.append(json.loads(summary_path.read_text()))
            candidates += _read_xyz(md_dir / f"{name}.xyz")
        if not (self.dir / "candidates.xyz").exists():
            for number, atoms in enumerate(candidates):
                atoms.info["candidate_index"] = number
            _atomic_xyz(self.dir / "candidates.xyz", candidates)
        return runs

    def md_runs(self):
        """(name, structure, temperature) for every start frame and temperature."""
        for path in _structure_files(self.config["md"]["structures"]):
            frames = read_structures(path)
            for (number, atoms), temperature in itertools.product(
                enumerate(frames), self.config["md"]["temperatures"]
            ):
                stem = Path(path).stem + (f"-{number}" if len(frames) > 1 else "")
                yield f"{stem}-{temperature:g}K", atoms, temperature

    def md_run(self, md_dir: Path, name: str, atoms: ase.Atoms, temperature: float,
               index: int) -> None:
        from pes_calc.calculator import PESCalculator
        from pes_calc.md import run_md

        md, selection = self.config["md"], self.config["selection"]
        device = None if self.config["device"] == "auto" else self.config["device"]
        watch = UncertaintyWatch(
            selection["max_uncertainty"], measure=selection["measure"],
            on_uncertain="record", log=md_dir / f"{name}-uncertainty.csv",
            interval=md["interval"])
        observers = [watch, (_StopAbove(watch, md["stop_uncertainty"]), md["interval"])]
        model = self.dir / "llpr" / "model.safetensors"
        start, error = time.perf_counter(), None
        try:
            summary = run_md(
                atoms.copy(), PESCalculator(model, device=device),
                ensemble=md["ensemble"], temperature=temperature, steps=md["steps"],
                timestep=md["timestep"], thermostat=md["thermostat"],
                friction=md["friction"], log=md_dir / f"{name}.log",
                log_interval=md["log_interval"], progress=False, observers=observers,
                seed=self.config["seed"] + 1000 * self.round + index)
        except (ValueError, FloatingPointError) as caught:  # e.g. atoms blown apart
            summary, error = None, f"{type(caught).__name__}: {caught}"
        finally:
            watch.close()
        if summary is not None:
            steps = summary.steps
        else:  # the last step checked before the failure
            steps = watch.history[-1][0] if watch.history else 0
        first = watch.first_exceeded_step
        run = {"name": name, "temperature_K": temperature, "steps": steps,
               "requested_steps": md["steps"], "first_uncertain_step": first,
               "steps_survived": steps if first is None else first,
               "max_uncertainty": _finite_or_none(watch.max_seen),
               "candidates": len(watch.recorded),
               "stop_reason": summary.stop_reason if summary else error,
               "wall_time_s": round(time.perf_counter() - start, 2)}
        _atomic_xyz(md_dir / f"{name}.xyz", [
            _candidate(a, name, temperature, self.round) for a in watch.recorded])
        _atomic_text(md_dir / f"{name}.json", json.dumps(run, indent=1))
        unit = UNCERTAINTY_MEASURES[selection["measure"]]
        over = "never over" if first is None else f"first over at step {first},"
        self.say(f"md {name}: {steps}/{md['steps']} steps, max σ "
                 f"{watch.max_seen:.3g} {unit}, {over} {len(watch.recorded)} recorded"
                 + (f", stopped: {run['stop_reason']}" if run["stop_reason"] else "")
                 + f" ({run['wall_time_s']:.0f} s)")

    def label(self, chosen: list[ase.Atoms], reference: Any) -> list[ase.Atoms]:
        """Reference labels for ``chosen``, appended one by one to
        labelled.partial.xyz (kept across interruptions), then labelled.xyz."""
        partial = self.dir / "labelled.partial.xyz"
        kept = _complete_frames(partial)
        _atomic_xyz(partial, kept)  # without a frame cut off by an interruption
        done = {atoms.info["candidate_index"]: atoms for atoms in kept}
        label_keys = LabelKeys.from_config(self.config["data"])
        failures = self.state.setdefault("label_failures", {})
        with open(partial, "a") as handle:
            for atoms in chosen:
                index = atoms.info["candidate_index"]
                if index in done:
                    continue
                try:
                    labelled = label_structure(atoms, reference, label_keys)
                except Exception as error:  # a reference failure skips one structure
                    failures[str(index)] = why = f"{type(error).__name__}: {error}"
                    self.say(f"labelling candidate {index} failed ({why})")
                    continue
                failures.pop(str(index), None)
                frame = io.StringIO()
                ase.io.write(frame, labelled, format="extxyz")
                handle.write(frame.getvalue())  # one write: a whole frame or none
                handle.flush()
                done[index] = labelled
        labelled = [done[a.info["candidate_index"]] for a in chosen
                    if a.info["candidate_index"] in done]
        _atomic_xyz(self.dir / "labelled.xyz", labelled)
        partial.unlink()
        return labelled

    def report(self, train_size: int, runs: list[dict[str, Any]],
               candidates: list, labelled: list, stop_reason: str | None
               ) -> RoundReport:
        survived = [run["steps_survived"] for run in runs]
        largest = [run["max_uncertainty"] for run in runs]
        return RoundReport(
            round=self.round, train_size=train_size, candidates=len(candidates),
            labelled=len(labelled),
            label_failures=len(self.state.get("label_failures", {})),
            md_runs=len(runs), md_runs_clean=sum(_clean(run) for run in runs),
            md_steps_survived=sum(survived), md_steps_survived_min=min(survived),
            md_steps_requested=sum(run["requested_steps"] for run in runs),
            max_uncertainty=math.inf if None in largest else max(largest),
            uncertainty_measure=self.config["selection"]["measure"],
            wall_time_s=round(sum(self.state["times"].values()), 1),
            stop_reason=stop_reason, test_metrics=self.state["test_metrics"])


def _clean(run: dict[str, Any]) -> bool:
    """An MD run that ran to the end without an uncertain structure."""
    return run["first_uncertain_step"] is None and run["stop_reason"] is None


class _StopAbove:
    """Ends a run after the watch's latest check measured a non-finite value or
    more than ``limit`` (if given): past it the model is far outside its data."""

    def __init__(self, watch: UncertaintyWatch, limit: float | None):
        self.watch, self.limit = watch, math.inf if limit is None else float(limit)

    def __call__(self, dynamics: Any) -> None:
        if not self.watch.history or self.watch.history[-1][0] != dynamics.nsteps:
            return
        step, energy_sigma, force_sigma = self.watch.history[-1]
        value = {"forces": force_sigma, "energy": energy_sigma,
                 "energy_per_atom": energy_sigma / len(dynamics.atoms),
                 }[self.watch.measure]
        if not math.isfinite(value):
            raise StopMD(f"non-finite uncertainty at step {step}")
        if value > self.limit:
            raise StopMD(f"uncertainty {value:.4g} over stop_uncertainty "
                         f"{self.limit:g} at step {step}")


# ------------------------------------------------------- select and label


def select(candidates: list[ase.Atoms], max_count: int,
           selection: Mapping[str, Any]) -> list[int]:
    """Indices of up to ``max_count`` candidates, most uncertain first (non-finite
    values last), skipping near-duplicates of those already chosen (module doc)."""
    def key(index: int) -> float:
        value = float(candidates[index].info["uncertainty"])
        return -value if math.isfinite(value) else math.inf

    prints = [fingerprint(atoms) for atoms in candidates]
    chosen: list[int] = []
    per_run: dict[str, int] = {}
    for index in sorted(range(len(candidates)), key=key):
        if len(chosen) >= max_count:
            break
        info = candidates[index].info
        run = info["md_run"]
        if selection["max_per_run"] and per_run.get(run, 0) >= selection["max_per_run"]:
            continue
        if any(candidates[j].info["md_run"] == run
               and abs(int(candidates[j].info["md_step"]) - int(info["md_step"]))
               < selection["min_separation_steps"] for j in chosen):
            continue
        if any(_near(prints[index], prints[j], selection["duplicate_tolerance"])
               for j in chosen):
            continue
        chosen.append(index)
        per_run[run] = per_run.get(run, 0) + 1
    return chosen


def fingerprint(atoms: ase.Atoms) -> tuple[tuple[bool, ...], np.ndarray]:
    """(pbc, sorted distances from every atom to its 12 nearest neighbours within
    6 Å, padded with 6 Å): invariant to rotations, translations and permutations."""
    from ase.neighborlist import neighbor_list

    first, distances = neighbor_list("id", atoms, FINGERPRINT_CUTOFF)
    table = np.full((len(atoms), FINGERPRINT_NEIGHBOURS), FINGERPRINT_CUTOFF)
    for atom in range(len(atoms)):
        nearest = np.sort(distances[first == atom])[:FINGERPRINT_NEIGHBOURS]
        table[atom, : len(nearest)] = nearest
    return tuple(bool(p) for p in atoms.pbc), np.sort(table.ravel())


def _near(a, b, tolerance: float) -> bool:
    return a[0] == b[0] and a[1].shape == b[1].shape and bool(
        np.sqrt(np.mean((a[1] - b[1]) ** 2)) <= tolerance)


def label_structure(
    atoms: ase.Atoms, reference: Any, label_keys: LabelKeys
) -> ase.Atoms:
    """A copy of ``atoms`` (no momenta, no model values) with the reference's
    energy, forces and, for a cell with a volume, stress, under ``label_keys``.
    Raises if the reference fails or returns a non-finite value."""
    from ase.calculators.calculator import PropertyNotImplementedError
    from ase.stress import voigt_6_to_full_3x3_stress

    keep = {k: v for k, v in atoms.info.items()
            if k not in ("model_energy", "energy", "stress")}
    work = ase.Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    work.calc = reference
    labels: dict[str, np.ndarray] = {"energy": np.array(work.get_potential_energy())}
    if label_keys.forces is not None:
        labels["forces"] = np.array(work.get_forces())
    if label_keys.stress is not None and work.cell.volume > 1e-12:
        with contextlib.suppress(PropertyNotImplementedError):  # left out then
            labels["stress"] = voigt_6_to_full_3x3_stress(work.get_stress())
    bad = [name for name, value in labels.items() if not np.all(np.isfinite(value))]
    if bad:
        raise FloatingPointError(f"the reference returned non-finite {', '.join(bad)}")
    result = ase.Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc,
                       info=keep)
    for name, value in labels.items():
        key = getattr(label_keys, name)
        if name == "forces":
            result.arrays[key] = value
        elif key is not None:
            result.info[key] = float(value) if name == "energy" else value
    return result


def _candidate(
    recorded: ase.Atoms, run: str, temperature: float, round_: int
) -> ase.Atoms:
    """A recorded structure with its model values renamed, so nothing reads them
    as labels."""
    atoms = ase.Atoms(recorded.numbers, recorded.positions, cell=recorded.cell,
                      pbc=recorded.pbc)
    atoms.info.update(
        config_type="active_learning", active_learning_round=round_, md_run=run,
        md_step=int(recorded.info["step"]), temperature_K=temperature,
        uncertainty=float(recorded.info["uncertainty"]),
        uncertainty_measure=recorded.info["uncertainty_measure"],
        model_energy=float(recorded.get_potential_energy()))
    atoms.arrays["model_forces"] = np.array(recorded.get_forces())
    return atoms


# ------------------------------------------------------------------- files


def _read_xyz(path: Path) -> list[ase.Atoms]:
    """Every frame of an extxyz file; an empty or absent file has none."""
    if not path.exists() or path.stat().st_size == 0:
        return []
    return list(ase.io.read(path, index=":", format="extxyz"))


def _complete_frames(path: Path) -> list[ase.Atoms]:
    """The frames of an extxyz file up to one that is cut off (or unreadable)."""
    frames: list[ase.Atoms] = []
    if path.exists():
        with contextlib.suppress(Exception):  # ASE raises many kinds on a cut frame
            frames.extend(ase.io.iread(path, format="extxyz"))
    return frames


def _atomic_xyz(path: Path, structures: list[ase.Atoms]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as handle:
        for atoms in structures:
            ase.io.write(handle, atoms, format="extxyz")
    os.replace(temporary, path)


def _atomic_text(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


# ------------------------------------------------------------------ report

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


def _milli(metrics: dict[str, float], name: str) -> str:
    return f"{1000 * metrics[name]:.2f}" if name in metrics else "–"


def _plain(metrics: dict[str, float], name: str) -> str:
    return f"{metrics[name]:.3g}" if name in metrics else "–"


def format_table(reports: list[RoundReport]) -> str:
    """A markdown table, one row per round: RMSEs and mean squared z-score of the
    forces on data.test, the largest uncertainty seen in MD, the MD steps before
    the first uncertain structure (the smallest per run, and the share of all
    requested steps), and the runs that never went over the threshold."""
    unit = UNCERTAINTY_MEASURES[reports[0].uncertainty_measure] if reports else ""
    rows = [[header.format(unit=unit) for header, _ in _COLUMNS],
            ["---"] * len(_COLUMNS)]
    rows += [[cell(report) for _, cell in _COLUMNS] for report in reports]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _write_tables(outdir: Path, reports: list[RoundReport]) -> None:
    names = [f.name for f in fields(RoundReport) if f.name != "test_metrics"]
    metrics = sorted({name for report in reports for name in report.test_metrics})

    def write(temporary: str) -> None:
        with open(temporary, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(names + [f"test_{name}" for name in metrics])
            for report in reports:
                row = asdict(report)
                writer.writerow([row[n] for n in names]
                                + [report.test_metrics.get(m, "") for m in metrics])

    temporary = outdir / "report.csv.tmp"
    write(str(temporary))
    os.replace(temporary, outdir / "report.csv")
    _atomic_text(outdir / "report.md", format_table(reports) + "\n")
