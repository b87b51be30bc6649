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
(every atom's 12 nearest-neighbor distances, sorted) is within
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

from pes_calc.active.candidates import (
    FINGERPRINT_CUTOFF,
    FINGERPRINT_NEIGHBORS,
    fingerprint,
    label_structure,
    select,
)
from pes_calc.active.config import (
    DEFAULTS,
    RETRAIN_MODES,
    TRAINING_KEYS,
    ActiveLearningConfigError,
    load_config,
    normalise,
    reference_factory,
)
from pes_calc.active.loop import run_active_learning
from pes_calc.active.report import RoundReport, format_table

__all__ = [
    "FINGERPRINT_CUTOFF",
    "FINGERPRINT_NEIGHBORS",
    "fingerprint",
    "label_structure",
    "select",
    "DEFAULTS",
    "RETRAIN_MODES",
    "TRAINING_KEYS",
    "ActiveLearningConfigError",
    "load_config",
    "normalise",
    "reference_factory",
    "run_active_learning",
    "RoundReport",
    "format_table",
]
