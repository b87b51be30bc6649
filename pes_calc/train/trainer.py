"""`train`: a YAML-shaped config → a trained ``OUTDIR/model.safetensors``.

The flow, in order: read the data → graphs at the model's cutoff → training-data
statistics → resolve ``${training_data_stats:NAME}`` → build (or load, to fine-tune)
the model → per-type shifts from the composition fit and scales from the force RMS
→ Adam with warm-up and cosine decay → per epoch: batches, validation, CSV log,
checkpoint, best model. Rerunning on the same OUTDIR resumes from the checkpoint;
the batch order depends only on (seed, epoch), so a resumed run retraces an
uninterrupted one exactly.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ase.data import chemical_symbols
from torch import nn

from pes_calc import keys
from pes_calc.build import DTYPES, build_model, cutoff_of
from pes_calc.graph import graph_to
from pes_calc.io import ModelFileError, load_model, save_model
from pes_calc.llpr import CALIBRATION_METHODS, LLPR, LinearisedEnsemble, linearise
from pes_calc.llpr import wrap as llpr_wrap
from pes_calc.potential import Potential
from pes_calc.train.data import (
    LabelKeys,
    batch_order,
    extract_labels,
    iterate_batches,
    labelled_graphs,
    load_graphs,
    read_structures,
    species_in,
)
from pes_calc.train.evaluation import evaluate
from pes_calc.train.losses import ensemble_loss_from_config, loss_from_config
from pes_calc.train.stats import (
    composition_energies,
    resolve_stats,
    training_data_stats,
)

# metatrain's names; checkpoints and validation every epoch since both are cheap
TRAINING_DEFAULTS: dict[str, Any] = {
    "batch_size": 8,
    "num_epochs": 100,
    "learning_rate": 1e-3,
    "warmup_fraction": 0.01,
    "weight_decay": 0.0,
    "grad_clip_norm": None,
    "scale_targets": True,
    "remove_composition_contribution": True,
    "fixed_composition_weights": {},
    # metatrain's names: {energy: {Cu: s}} (or by atomic number) fixes the per-type
    # energy scales instead of fitting them to the forces
    "fixed_scaling_weights": {},
    # accepted for metatrain configs; here MAEs are always logged, the one target
    # (energy) has one block, energy errors are reported per atom and per
    # structure, and batches are built in-process (no DataLoader workers)
    "log_mae": False,
    "log_separate_blocks": False,
    "per_structure_targets": [],
    "num_workers": None,
    "log_interval": 1,
    "checkpoint_interval": 1,
    "best_model_metric": "rmse_prod",
    "loss": None,
    "finetune": None,
    "distributed": False,
}
# the llpr wrapper's trainer (metatrain's names and defaults); num_epochs null means
# covariance + calibration only, no ensemble-weight training
LLPR_TRAINING_DEFAULTS: dict[str, Any] = {
    "model_checkpoint": None,
    "batch_size": 8,
    "regularizer": None,
    "calibration_method": "absolute_residuals",
    "loss": "ensemble_nll",
    "num_epochs": None,
    "train_all_parameters": False,
    "warmup_fraction": 0.01,
    "learning_rate": 3e-4,
    "weight_decay": None,
    "log_interval": 1,
    "checkpoint_interval": 100,
    "best_model_metric": "loss",
    "grad_clip_norm": 1.0,
    "distributed": False,
}
LLPR_MODEL_DEFAULTS: dict[str, Any] = {"num_ensemble_members": {}}
DATA_KEYS = {"train", "val", "test", "energy_key", "forces_key", "stress_key",
             "isolated_atom_energies"}
TOP_LEVEL_KEYS = {"seed", "device", "data", "architecture"}
BEST_MODEL_METRICS = ("rmse_prod", "mae_prod", "loss")
CHECKPOINT_FORMAT = "pes_calc.checkpoint"
# the learning rate decays along a cosine to this fraction of its peak
FINAL_LR_FRACTION = 0.01


class TrainingConfigError(ValueError):
    """A training config that cannot be run as written."""


@dataclass
class TrainResult:
    """What a finished run produced."""

    model: Potential
    model_path: Path
    best_epoch: int
    val_metrics: dict[str, float]
    test_metrics: dict[str, float]
    training_time_s: float


def _check_keys(given: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    """An unknown key is an error naming the known ones (a typo never falls back)."""
    unknown = set(given) - set(known)
    if unknown:
        raise TrainingConfigError(
            f"unknown {where} keys {sorted(unknown)}; known: {', '.join(sorted(known))}"
        )


def normalise_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with defaults filled in; unknown keys are errors."""
    config = copy.deepcopy(dict(config))
    _check_keys(config, TOP_LEVEL_KEYS, "top-level")
    for required in ("data", "architecture"):
        if required not in config:
            raise TrainingConfigError(f"the config needs a {required!r} section")
    data = dict(config["data"])
    _check_keys(data, DATA_KEYS, "data")
    for required in ("train", "val"):
        if required not in data:
            raise TrainingConfigError(f"data needs a {required!r} file")
    architecture = dict(config["architecture"])
    if "name" not in architecture:
        raise TrainingConfigError("the architecture section needs a 'name'")
    _check_keys(architecture, ("name", "model", "training", "species"), "architecture")
    training = dict(architecture.get("training") or {})
    is_llpr = architecture["name"] == "llpr"
    defaults = LLPR_TRAINING_DEFAULTS if is_llpr else TRAINING_DEFAULTS
    _check_keys(training, defaults, "training")
    training = {**copy.deepcopy(defaults), **training}
    if training["best_model_metric"] not in BEST_MODEL_METRICS:
        raise TrainingConfigError(
            f"best_model_metric must be one of {BEST_MODEL_METRICS}, "
            f"got {training['best_model_metric']!r}"
        )
    for name in ("batch_size", "num_epochs", "log_interval", "checkpoint_interval"):
        if is_llpr and name == "num_epochs" and training[name] is None:
            continue
        if not isinstance(training[name], int) or training[name] < 1:
            raise TrainingConfigError(f"{name} must be a positive integer")
    architecture["model"] = dict(architecture.get("model") or {})
    if is_llpr:
        architecture["model"] = _llpr_model_section(architecture["model"], training)
    architecture["training"] = training
    return {
        "seed": int(config.get("seed", 0)),
        "device": str(config.get("device", "cpu")),
        "data": data,
        "architecture": architecture,
    }


def _llpr_model_section(model: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
    """The llpr ``model`` section checked: ``num_ensemble_members: {energy: M}``."""
    _check_keys(model, LLPR_MODEL_DEFAULTS, "llpr model")
    members = model.get("num_ensemble_members", {}) or {}
    if not isinstance(members, Mapping) or set(members) - {"energy"}:
        raise TrainingConfigError(
            "num_ensemble_members must map targets to member counts, e.g. "
            "{energy: 16}; energy is the one target (forces follow from it)"
        )
    count = members.get("energy", 0)
    if not isinstance(count, int) or count < 0:
        raise TrainingConfigError("num_ensemble_members.energy must be an integer ≥ 0")
    if not training["model_checkpoint"]:
        raise TrainingConfigError(
            "an llpr config needs training.model_checkpoint: the trained model to wrap"
        )
    if training["num_epochs"] is not None and count < 2:
        raise TrainingConfigError(
            "ensemble training (num_epochs set) needs num_ensemble_members.energy ≥ 2"
        )
    if training["distributed"]:
        raise TrainingConfigError("llpr fitting runs in one process (distributed: false)")
    if training["calibration_method"] not in CALIBRATION_METHODS:
        raise TrainingConfigError(
            f"unknown calibration_method {training['calibration_method']!r}; choose "
            f"from {', '.join(CALIBRATION_METHODS)}"
        )
    return {"num_ensemble_members": {"energy": count}}


class _Distributed:
    """Rank and world size; one process unless ``distributed: true`` under torchrun."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.rank, self.world_size = 0, 1
        if not enabled:
            return
        if "WORLD_SIZE" not in os.environ:
            raise TrainingConfigError(
                "distributed: true needs torchrun (e.g. torchrun --nproc-per-node 2 "
                "-m pes_calc.cli train config.yaml -o out)"
            )
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, value: float) -> float:
        if not self.enabled:
            return value
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.item()

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank."""
        if not self.enabled:
            return flag
        import torch.distributed as dist

        tensor = torch.tensor([int(flag)])
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()


def _atomic_write(write: Callable[[str], None], path: Path) -> None:
    """Write through a temporary file so an interruption never leaves half a file."""
    temporary = path.with_name(path.name + ".tmp")
    write(str(temporary))
    os.replace(temporary, path)


def _learning_rate_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to `FINAL_LR_FRACTION`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return FINAL_LR_FRACTION + (1.0 - FINAL_LR_FRACTION) * cosine


def _selection_value(metrics: dict[str, float], val_loss: float, metric: str) -> float:
    return val_loss if metric == "loss" else metrics.get(metric, val_loss)


def _format_metrics(metrics: dict[str, float]) -> str:
    """``E 1.23 meV/atom | F 45.6 meV/Å | S 0.12 meV/Å³`` from RMSEs in eV units."""
    parts = []
    for name, short, unit in (
        ("energy_per_atom", "E", "meV/atom"),
        ("forces", "F", "meV/Å"),
        ("stress", "S", "meV/Å³"),
    ):
        if f"{name}_rmse" in metrics:
            parts.append(f"{short} {1000 * metrics[f'{name}_rmse']:.3g} {unit}")
    return " | ".join(parts)


def train(
    config: Mapping[str, Any],
    outdir: str | os.PathLike,
    *,
    progress: bool = True,
    callbacks: Sequence[Callable[[int, dict[str, float]], None]] = (),
) -> TrainResult:
    """Train the model ``config`` describes; write it to ``outdir/model.safetensors``.

    ``callbacks`` are called as ``callback(epoch, row)`` after each epoch's
    checkpoint, with the epoch's log row (losses and validation errors).
    """
    config = normalise_config(config)
    outdir = Path(outdir)
    section = config["architecture"]
    name, training = section["name"], section["training"]
    data = config["data"]
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu")
        if config["device"] == "auto" else config["device"]
    )
    distributed = _Distributed(bool(training["distributed"]), device)
    if distributed.is_main:
        outdir.mkdir(parents=True, exist_ok=True)
    start_time = time.perf_counter()

    # the data, at the cutoff of the model to come (or of the model to fine-tune)
    label_keys = LabelKeys.from_config(data)
    train_structures = read_structures(data["train"])
    train_labels = extract_labels(train_structures, label_keys, name=str(data["train"]))
    base_model: Potential | None = None
    is_llpr = name == "llpr"
    if is_llpr:
        base_model = _model_to_wrap(training["model_checkpoint"])
        species, cutoff = base_model.species, base_model.cutoff
    elif training["finetune"]:
        base_model = _model_to_finetune(training["finetune"], name)
        species, cutoff = base_model.species, base_model.cutoff
    else:
        species = list(section.get("species") or species_in(train_structures))
        cutoff = cutoff_of(name, section["model"])
    train_graphs = labelled_graphs(train_structures, train_labels, species, cutoff,
                                   name=str(data["train"]))
    val_graphs = load_graphs(data["val"], species, cutoff, label_keys)
    stats = training_data_stats(train_graphs, species)

    # the model, its per-type shifts and scales
    if is_llpr:
        model = _fit_llpr(base_model, section, config, train_graphs, val_graphs, device,
                          progress and distributed.is_main)
    elif base_model is not None:
        model = base_model
    else:
        hypers = resolve_stats(section["model"], stats, "architecture.model.")
        hypers.setdefault("seed", config["seed"])
        model = build_model(name, species, **hypers)
        _set_shifts_and_scales(model, section["model"], training, data, train_graphs, stats)
    if not is_llpr:  # a wrapper keeps the statistics its model was trained with
        model.config["training_data_stats"] = stats
    dtype = DTYPES[model.config["model"]["model_dtype"]]
    model = model.to(device)
    train_graphs = [graph_to(g, torch.device("cpu"), dtype) for g in train_graphs]
    val_graphs = [graph_to(g, torch.device("cpu"), dtype) for g in val_graphs]

    available = sorted(train_graphs[0].properties)
    if is_llpr:
        loss_fn = ensemble_loss_from_config(training["loss"], available)
        for parameter in model.potential.parameters():
            parameter.requires_grad_(parameter.requires_grad and training["train_all_parameters"])
        model.state.ensemble_displacements.requires_grad_(True)
    else:
        loss_fn = loss_from_config(training["loss"], available)
    loss_fn.pre_fit(train_graphs)
    compute_forces = keys.FORCES in loss_fn.required_properties
    compute_stress = keys.STRESS in loss_fn.required_properties
    if (compute_forces or compute_stress) and not model.do_derivatives:
        raise TrainingConfigError("force or stress losses need do_derivatives: true")

    parameters = [p for p in model.parameters() if p.requires_grad]
    num_epochs = training["num_epochs"] or 0  # llpr: null means no ensemble training
    optimizer = torch.optim.Adam(
        parameters, lr=training["learning_rate"], weight_decay=training["weight_decay"] or 0.0
    )
    steps_per_epoch = len(
        batch_order(len(train_graphs), training["batch_size"], shuffle=True,
                    rank=distributed.rank, world_size=distributed.world_size)
    )
    total_steps = steps_per_epoch * num_epochs
    warmup_steps = max(1, int(training["warmup_fraction"] * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _learning_rate_factor(step, warmup_steps, total_steps)
    )

    # resume
    checkpoint_path = outdir / "checkpoint.pt"
    model_path = outdir / "model.safetensors"
    log_path = outdir / "train.csv"
    state = {"epoch": 0, "best_value": math.inf, "best_epoch": 0,
             "best_metrics": {}, "elapsed_s": 0.0}
    best_state = copy.deepcopy(model.state_dict())
    if checkpoint_path.exists():
        checkpoint = _read_checkpoint(checkpoint_path, config)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        best_state = checkpoint["best_model"]
        state = checkpoint["state"]
        if distributed.is_main:
            print(f"resuming {outdir} after epoch {state['epoch']}", flush=True)
    elapsed_before = state["elapsed_s"]
    log_rows: list[dict[str, Any]] = _read_log(log_path, state["epoch"])

    # what the loop runs: the model, or for a frozen LLPR backbone its linearised
    # ensemble on cached features (the model itself never runs again)
    fitted: nn.Module = model
    if is_llpr and num_epochs > 0 and not training["train_all_parameters"]:
        with_stress = keys.STRESS in available
        if progress and distributed.is_main:
            print("caching last-layer features and their Jacobians", flush=True)
        train_graphs = linearise(model, train_graphs, with_stress, device)
        val_graphs = linearise(model, val_graphs, with_stress, device)
        fitted = LinearisedEnsemble(model)
    trained = fitted
    if distributed.enabled:
        # a batch without some species leaves that species' weights unused
        trained = nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=len(species) > 1
        )
    model.train()

    bar = _progress_bar(progress and distributed.is_main, total_steps,
                        state["epoch"] * steps_per_epoch)
    for epoch in range(state["epoch"] + 1, num_epochs + 1):
        loss_sum, term_sums, num_batches = 0.0, {}, 0
        order = batch_order(len(train_graphs), training["batch_size"], shuffle=True,
                            seed=config["seed"], epoch=epoch, rank=distributed.rank,
                            world_size=distributed.world_size)
        for batch in iterate_batches(train_graphs, order, device, dtype):
            optimizer.zero_grad(set_to_none=True)
            predictions = trained(batch, compute_forces, compute_stress)
            total, terms = loss_fn(model, batch, predictions)
            if not torch.isfinite(total):
                raise FloatingPointError(
                    f"epoch {epoch}: the loss is {total.item()}; lower learning_rate or "
                    f"set grad_clip_norm. {checkpoint_path} holds the last good epoch"
                )
            total.backward()
            if training["grad_clip_norm"] is not None:
                nn.utils.clip_grad_norm_(parameters, float(training["grad_clip_norm"]))
            optimizer.step()
            scheduler.step()
            loss_sum += total.item()
            for term, value in terms.items():
                term_sums[term] = term_sums.get(term, 0.0) + value.item()
            num_batches += 1
            if bar is not None:
                bar.update(1)
        num_batches = distributed.sum(num_batches)
        row: dict[str, float] = {
            "epoch": epoch,
            "learning_rate": optimizer.param_groups[0]["lr"],
            "train_loss": distributed.sum(loss_sum) / num_batches,
        }
        for term, value in term_sums.items():
            row[f"train_{term}"] = distributed.sum(value) / num_batches

        validate = epoch % training["log_interval"] == 0 or epoch == num_epochs
        improved = False
        if validate and distributed.is_main:
            metrics, val_loss = _validate(fitted, val_graphs, loss_fn, training, device)
            row["val_loss"] = val_loss
            row.update({f"val_{k}": v for k, v in metrics.items() if k != "num_structures"})
            value = _selection_value(metrics, val_loss, training["best_model_metric"])
            if value < state["best_value"]:
                improved = True
                state.update(best_value=value, best_epoch=epoch, best_metrics=metrics)
            message = (f"epoch {epoch:>4} | loss {row['train_loss']:.4g} | "
                       f"val {_format_metrics(metrics)}")
            if bar is not None and not bar.disable:
                bar.set_postfix_str(_format_metrics(metrics))
                bar.write(message)
            elif progress:
                print(message, flush=True)
        # rank 0 validates; every rank keeps the same best weights
        if validate and distributed.broadcast_flag(improved):
            best_state = copy.deepcopy(model.state_dict())
            if distributed.is_main:
                _save_best(model, best_state, model_path, config, state, {})
        state["epoch"] = epoch
        state["elapsed_s"] = elapsed_before + time.perf_counter() - start_time
        row["time_s"] = state["elapsed_s"]
        if distributed.is_main:
            log_rows.append(row)
            _write_log(log_path, log_rows)
            if epoch % training["checkpoint_interval"] == 0 or epoch == num_epochs:
                _atomic_write(
                    lambda tmp: torch.save(
                        {"format": CHECKPOINT_FORMAT, "config": config,
                         "model": model.state_dict(), "best_model": best_state,
                         "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "state": state},
                        tmp,
                    ),
                    checkpoint_path,
                )
        for callback in callbacks:
            callback(epoch, row)
    if bar is not None:
        bar.close()

    # the best model, with its test errors, is the result
    model.load_state_dict(best_state)
    model.eval()
    if is_llpr:
        model.state.ensemble_displacements.requires_grad_(False)
        if training["train_all_parameters"] and num_epochs > 0:
            # the features moved: refit σ's covariance and α, keep the trained ensemble
            _refit_llpr_uncertainty(model, training, train_graphs, val_graphs, device)
            best_state = copy.deepcopy(model.state_dict())
    test_metrics: dict[str, float] = {}
    if distributed.is_main:
        if data.get("test"):
            test_graphs = load_graphs(data["test"], species, cutoff, label_keys, dtype)
            test_metrics = evaluate(model, test_graphs, batch_size=training["batch_size"],
                                    device=device, dtype=dtype).metrics()
            if progress:
                print(f"test ({data['test']}): {_format_metrics(test_metrics)}", flush=True)
        _save_best(model, best_state, model_path, config, state, test_metrics)
    distributed.barrier()
    return TrainResult(
        model=model,
        model_path=model_path,
        best_epoch=state["best_epoch"],
        val_metrics=state["best_metrics"],
        test_metrics=test_metrics,
        training_time_s=state["elapsed_s"],
    )


def _model_to_wrap(path: str) -> Potential:
    """The trained model an llpr config wraps (an LLPR file: its inner model)."""
    try:
        model = load_model(path)
    except ModelFileError as error:
        raise TrainingConfigError(f"model_checkpoint: {error}") from error
    return model.potential if isinstance(model, LLPR) else model


def _fit_llpr(
    potential: Potential,
    section: Mapping[str, Any],
    config: Mapping[str, Any],
    train_graphs: Sequence,
    val_graphs: Sequence,
    device: torch.device,
    verbose: bool,
) -> LLPR:
    """Covariance over the training set, Cholesky, α on the validation set and the
    sampled ensemble: one pass over each set."""
    training = section["training"]
    start = time.perf_counter()
    llpr = llpr_wrap(
        potential.to(device),
        section["model"]["num_ensemble_members"]["energy"],
        train_graphs,  # batches are cast to the model's dtype as they are made
        val_graphs,
        regularizer=training["regularizer"],
        calibration_method=training["calibration_method"],
        batch_size=training["batch_size"],
        device=device,
        seed=config["seed"],
    )
    if verbose:
        settings = llpr.config["llpr"]
        print(
            f"LLPR: covariance of {llpr.num_features} features, regularizer "
            f"{settings['regularizer']:.1e}, calibration α {settings['multiplier']:.4g} "
            f"({settings['calibration_method']}), {llpr.num_ensemble_members} ensemble "
            f"members, {time.perf_counter() - start:.1f} s",
            flush=True,
        )
    return llpr


def _refit_llpr_uncertainty(model: LLPR, training, train_graphs, val_graphs, device) -> None:
    from pes_calc.llpr import calibrate, factorise, fit_covariance

    fit_covariance(model, train_graphs, training["batch_size"], device)
    model.config["llpr"]["regularizer"] = factorise(model, training["regularizer"])
    model.config["llpr"]["multiplier"] = calibrate(
        model, val_graphs, training["calibration_method"], training["batch_size"], device
    )


def _model_to_finetune(spec: Any, name: str) -> Potential:
    """The model named by ``finetune: {read_from: PATH}`` (or a bare path)."""
    path = spec.get("read_from") if isinstance(spec, Mapping) else spec
    if not path:
        raise TrainingConfigError("finetune needs read_from: the model file to start from")
    model = load_model(path)
    if model.config["name"] != name:
        raise TrainingConfigError(
            f"finetune: {path} is a {model.config['name']} model, but the config "
            f"trains {name}"
        )
    return model


def _set_shifts_and_scales(
    model: Potential,
    given_hypers: Mapping[str, Any],
    training: Mapping[str, Any],
    data: Mapping[str, Any],
    graphs: Sequence,
    stats: Mapping[str, Any],
) -> None:
    """metatrain's composition model and scaling, as the potential's per-type shifts
    and scales. Values given explicitly in the model hyperparameters win."""
    species = model.species
    fixed_by_symbol = {
        **(data.get("isolated_atom_energies") or {}),
        **per_type_values(training["fixed_composition_weights"], "fixed_composition_weights"),
    }
    unknown = set(fixed_by_symbol) - set(species)
    if unknown:
        raise TrainingConfigError(
            f"fixed composition weights for {sorted(unknown)}, which the model "
            f"({', '.join(species)}) does not have"
        )
    fixed = {species.index(s): float(e) for s, e in fixed_by_symbol.items()}
    shifts = None
    if "per_type_energy_shifts" not in given_hypers and keys.ENERGY in graphs[0].properties:
        if training["remove_composition_contribution"]:
            shifts = composition_energies(graphs, len(species), fixed)
        elif fixed:
            shifts = [fixed.get(t, 0.0) for t in range(len(species))]
    if shifts is not None:
        model.per_type_energy_shifts.data.copy_(torch.tensor(shifts))
        model.config["model"]["per_type_energy_shifts"] = shifts
    fixed_scales = per_type_values(training["fixed_scaling_weights"], "fixed_scaling_weights", species)
    if fixed_scales and "per_type_energy_scales" not in given_hypers:
        unknown = set(fixed_scales) - set(species)
        if unknown:
            raise TrainingConfigError(
                f"fixed scaling weights for {sorted(unknown)}, which the model "
                f"({', '.join(species)}) does not have"
            )
        scales = model.per_type_energy_scales.detach().clone()
        if training["scale_targets"] and stats.get("forces_rms"):
            scales.fill_(float(stats["forces_rms"]))
        for symbol, value in fixed_scales.items():
            scales[species.index(symbol)] = float(value)
        model.per_type_energy_scales.data.copy_(scales)
        model.config["model"]["per_type_energy_scales"] = scales.tolist()
    elif training["scale_targets"] and "per_type_energy_scales" not in given_hypers:
        # forces set the natural energy scale; energy-only data uses the spread of
        # per-atom energies left after the composition fit
        scale = stats.get("forces_rms")
        if scale is None and shifts is not None:
            scale = _residual_per_atom_std(graphs, shifts)
        if scale:
            model.per_type_energy_scales.data.fill_(float(scale))
            model.config["model"]["per_type_energy_scales"] = float(scale)


def per_type_values(
    table: Mapping[Any, Any] | None, name: str, species: Sequence[str] | None = None
) -> dict[str, float]:
    """{symbol: value} from ``{Cu: v}``, metatrain's ``{energy: {Cu: v}}`` or
    ``{energy: {29: v}}`` (atomic numbers, as metatrain writes them); a single
    ``{energy: v}`` applies to every type in ``species``."""
    if not table:
        return {}
    if not isinstance(table, Mapping):
        raise TrainingConfigError(f"{name} must be a mapping, got {table!r}")
    if "energy" in table:
        if set(table) != {"energy"}:
            others = sorted(str(k) for k in table if k != "energy")
            raise TrainingConfigError(f"{name}: only the energy target exists here, not {others}")
        table = table["energy"]
        if isinstance(table, (int, float)) and species is not None:
            return {symbol: float(table) for symbol in species}
    if not isinstance(table, Mapping):
        raise TrainingConfigError(f"{name} must map types to numbers, got {table!r}")
    values: dict[str, float] = {}
    for key, value in table.items():
        symbol = key
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            number = int(key)
            if not 0 < number < len(chemical_symbols):
                raise TrainingConfigError(f"{name}: {key} is not an atomic number")
            symbol = chemical_symbols[number]
        try:
            values[str(symbol)] = float(value)
        except (TypeError, ValueError):
            raise TrainingConfigError(f"{name}: {key}: {value!r} is not a number") from None
    return values


def _residual_per_atom_std(graphs: Sequence, shifts: list[float]) -> float | None:
    residuals = []
    table = torch.tensor(shifts, dtype=torch.float64)
    for graph in graphs:
        energy = graph.properties[keys.ENERGY].double()
        if torch.isfinite(energy).all():
            composition = table[graph.species].sum()
            residuals.append(((energy.sum() - composition) / graph.species.numel()).item())
    return float(torch.tensor(residuals).std()) if len(residuals) > 1 else None


def _validate(model, graphs, loss_fn, training, device):
    """Validation errors and loss, in eval mode (no graph kept for second derivatives)."""
    model.eval()
    try:
        evaluation = evaluate(model, graphs, batch_size=training["batch_size"],
                              device=device, loss_fn=loss_fn)
        metrics = evaluation.metrics()
        val_loss = evaluation.mean_loss
    finally:
        model.train()
    return metrics, val_loss


def _save_best(model, best_state, path, config, state, test_metrics) -> None:
    """``model.safetensors`` with the best weights, statistics and errors."""
    snapshot = copy.deepcopy(model).cpu()
    snapshot.load_state_dict(best_state)
    record = {
        "data": {k: str(config["data"][k]) for k in ("train", "val", "test")
                 if config["data"].get(k)},
        "best_epoch": state["best_epoch"],
        "epochs_run": state["epoch"],
        "training_time_s": round(state["elapsed_s"], 1),
        "val_metrics": state["best_metrics"],
        "test_metrics": test_metrics,
        "hyperparameters": config["architecture"]["training"],
        "seed": config["seed"],
    }
    if isinstance(snapshot, LLPR):  # the wrapped model keeps its own training record
        snapshot.config["llpr"]["training"] = record
    else:
        snapshot.config["training"] = record
    _atomic_write(lambda tmp: save_model(snapshot, tmp), path)


def _read_checkpoint(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise TrainingConfigError(
            f"{path} cannot be read ({error}); delete it to start the run afresh"
        ) from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise TrainingConfigError(f"{path} is not a pes_calc training checkpoint")
    previous = _comparable(checkpoint["config"])
    current = _comparable(config)
    if previous != current:
        raise TrainingConfigError(
            f"{path.parent} holds a run with a different config; use another output "
            "directory or delete its checkpoint.pt to start again"
        )
    return checkpoint


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The parts of a config a resumed run must share with the checkpoint's: not
    num_epochs (more may be asked for), and file paths compared as absolute paths
    (so "data/x.xyz" and "/work/data/x.xyz" are the same run)."""
    config = copy.deepcopy(config)
    config["architecture"]["training"].pop("num_epochs", None)
    for section, names in ((config.get("data", {}), ("train", "val", "test")),
                           (config["architecture"]["training"], ("model_checkpoint",))):
        for name in names:
            if isinstance(section.get(name), str):
                section[name] = os.path.abspath(section[name])
    return config


def _read_log(path: Path, last_epoch: int) -> list[dict[str, str]]:
    """The log rows up to the checkpoint a run resumes from (later ones are redone)."""
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [row for row in rows if int(float(row["epoch"])) <= last_epoch]


def _write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    """The whole per-epoch CSV; columns are the union over rows (validation
    columns appear only on validation epochs)."""
    fieldnames: list[str] = []
    for row in rows:
        fieldnames += [key for key in row if key not in fieldnames]

    def write(temporary: str) -> None:
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fieldnames, restval="")
            writer.writeheader()
            writer.writerows(rows)

    _atomic_write(write, path)


def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # disable=None: a bar on terminals, the per-epoch lines alone in log files
    return tqdm(total=total, initial=initial, unit="batch", dynamic_ncols=True,
                desc="training", disable=None)


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML training config; relative data paths are read from the current
    directory, as metatrain does."""
    import yaml

    with open(path) as handle:
        config = yaml.safe_load(handle)
    if not isinstance(config, dict):
        raise TrainingConfigError(f"{path} is not a YAML mapping")
    return config
