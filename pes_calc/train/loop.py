"""`train`: a YAML-shaped config → a trained ``OUTDIR/model.safetensors``.

The steps, in order: read the data → graphs at the model's cutoff → training-data
statistics → the model and its loss, as its kind of run makes them (a fresh
model, a fine-tuned one, an LLPR wrapper: `ModelSetup`) → Adam with warm-up and
cosine decay → per epoch: batches, validation, CSV log, checkpoint, best model →
the best model with its test errors. Rerunning on the same OUTDIR resumes from
the checkpoint; the batch order depends only on (seed, epoch), so a resumed run
retraces an uninterrupted one exactly.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pes_calc import keys
from pes_calc.build import DTYPES
from pes_calc.graph import AtomicGraph, batch_order, graph_to, iterate_batches
from pes_calc.llpr import LLPR
from pes_calc.potential import Potential
from pes_calc.train.checkpoint import (
    read_checkpoint,
    read_log,
    save_best,
    write_checkpoint,
    write_log,
)
from pes_calc.train.config import TrainingConfigError, normalise_config
from pes_calc.train.data import load_graphs
from pes_calc.train.distributed import Distributed
from pes_calc.train.evaluation import measure_errors
from pes_calc.train.llpr_training import LLPRSetup
from pes_calc.train.losses import TotalLoss
from pes_calc.train.progress import format_metrics, progress_bar, report_epoch
from pes_calc.train.setup import (
    FineTuneSetup,
    FreshSetup,
    ModelSetup,
    TrainingData,
    read_training_data,
)

__all__ = ["FINAL_LR_FRACTION", "TrainResult", "model_setup", "train"]

# the learning rate decays along a cosine to this fraction of its peak
FINAL_LR_FRACTION = 0.01

# an epoch's log row: epoch, learning rate, losses, validation errors, time (s)
Row = dict[str, float]


@dataclass
class TrainResult:
    """What a finished run produced."""

    model: Potential | LLPR
    model_path: Path
    best_epoch: int
    val_metrics: dict[str, float]
    test_metrics: dict[str, float]
    training_time_s: float


@dataclass
class _Optimization:
    """What a training step needs besides the batch."""

    trained: nn.Module  # the module a batch runs through (maybe DDP-wrapped)
    model: nn.Module  # the model the loss is given (a Potential or an LLPR)
    loss_fn: TotalLoss
    parameters: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    grad_clip_norm: float | None
    compute_forces: bool
    compute_stress: bool


def model_setup(config: Mapping[str, Any]) -> ModelSetup:
    """The setup of the run ``config`` (normalised) describes."""
    section = config["architecture"]
    if section["name"] == "llpr":
        return LLPRSetup(config)
    if section["training"]["finetune"]:
        return FineTuneSetup(config)
    return FreshSetup(config)


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
    training = config["architecture"]["training"]
    device = _device(config["device"])
    distributed = Distributed(bool(training["distributed"]), device)
    if distributed.is_main:
        outdir.mkdir(parents=True, exist_ok=True)
    start_time = time.perf_counter()
    verbose = progress and distributed.is_main

    # the data at the model's cutoff, then the model and its loss
    setup = model_setup(config)
    data = read_training_data(config, setup)
    model, loss_fn, dtype = _model_and_loss(setup, data, device, verbose)

    # Adam with warm-up and cosine decay over every step of the run
    parameters = [p for p in model.parameters() if p.requires_grad]
    num_epochs = training["num_epochs"] or 0  # llpr: null means no ensemble training
    optimizer = torch.optim.Adam(
        parameters,
        lr=training["learning_rate"],
        weight_decay=training["weight_decay"] or 0.0,
    )
    steps_per_epoch = len(
        batch_order(
            len(data.train_graphs),
            training["batch_size"],
            shuffle=True,
            rank=distributed.rank,
            world_size=distributed.world_size,
        )
    )
    total_steps = steps_per_epoch * num_epochs
    scheduler = _scheduler(optimizer, training["warmup_fraction"], total_steps)

    # resume: weights, optimizer, schedule, best weights and the log so far
    checkpoint_path = outdir / "checkpoint.pt"
    model_path = outdir / "model.safetensors"
    log_path = outdir / "train.csv"
    state, best_state = _resume(
        checkpoint_path,
        config,
        model,
        optimizer,
        scheduler,
        announce=distributed.is_main,
    )
    elapsed_before = state["elapsed_s"]
    log_rows: list[dict[str, Any]] = read_log(log_path, state["epoch"])

    fitted, train_graphs, val_graphs = setup.loop_module(
        model, data.train_graphs, data.val_graphs, device, verbose
    )
    trained = fitted
    if distributed.enabled:
        # a batch without some species leaves that species' weights unused
        trained = nn.parallel.DistributedDataParallel(
            fitted, find_unused_parameters=len(data.species) > 1
        )
    step = _Optimization(
        trained,
        model,
        loss_fn,
        parameters,
        optimizer,
        scheduler,
        training["grad_clip_norm"],
        compute_forces=keys.FORCES in loss_fn.required_properties,
        compute_stress=keys.STRESS in loss_fn.required_properties,
    )
    model.train()

    bar = progress_bar(verbose, total_steps, state["epoch"] * steps_per_epoch)
    for epoch in range(state["epoch"] + 1, num_epochs + 1):
        order = batch_order(
            len(train_graphs),
            training["batch_size"],
            shuffle=True,
            seed=config["seed"],
            epoch=epoch,
            rank=distributed.rank,
            world_size=distributed.world_size,
        )
        batches = iterate_batches(train_graphs, order, device, dtype)
        row = _train_epoch(step, batches, epoch, distributed, bar, checkpoint_path)

        validate = epoch % training["log_interval"] == 0 or epoch == num_epochs
        improved = False
        if validate and distributed.is_main:
            metrics, val_loss = _validate(fitted, val_graphs, loss_fn, training, device)
            improved = _record_validation(
                epoch, row, state, metrics, val_loss, training
            )
            report_epoch(epoch, row["train_loss"], metrics, bar, progress)
        # rank 0 validates; every rank keeps the same best weights
        if validate and distributed.broadcast_flag(improved):
            best_state = copy.deepcopy(model.state_dict())
            if distributed.is_main:
                save_best(model, best_state, model_path, config, state, {})
        state["epoch"] = epoch
        state["elapsed_s"] = elapsed_before + time.perf_counter() - start_time
        row["time_s"] = state["elapsed_s"]
        if distributed.is_main:
            log_rows.append(row)
            write_log(log_path, log_rows)
            if epoch % training["checkpoint_interval"] == 0 or epoch == num_epochs:
                write_checkpoint(
                    checkpoint_path,
                    config,
                    model,
                    best_state,
                    optimizer,
                    scheduler,
                    state,
                )
        for callback in callbacks:
            callback(epoch, row)
    if bar is not None:
        bar.close()

    # the best model, with its test errors, is the result
    model.load_state_dict(best_state)
    model.eval()
    if setup.finish(model, data, device):
        best_state = copy.deepcopy(model.state_dict())
    test_metrics: dict[str, float] = {}
    if distributed.is_main:
        test_metrics = _test_errors(model, config, data, dtype, device, progress)
        save_best(model, best_state, model_path, config, state, test_metrics)
    distributed.barrier()
    return TrainResult(
        model=model,
        model_path=model_path,
        best_epoch=state["best_epoch"],
        val_metrics=state["best_metrics"],
        test_metrics=test_metrics,
        training_time_s=state["elapsed_s"],
    )


def _model_and_loss(
    setup: ModelSetup, data: TrainingData, device: torch.device, verbose: bool
) -> tuple[Potential | LLPR, TotalLoss, torch.dtype]:
    """The model on ``device``, its loss and its dtype; ``data``'s graphs are cast
    to that dtype (on the CPU)."""
    model = setup.model(data, device, verbose)
    dtype = DTYPES[model.config["model"]["model_dtype"]]
    model = model.to(device)
    data.train_graphs = _on_cpu(data.train_graphs, dtype)
    data.val_graphs = _on_cpu(data.val_graphs, dtype)
    loss_fn = setup.loss(sorted(data.train_graphs[0].properties))
    setup.set_trainable(model)
    loss_fn.pre_fit(data.train_graphs)
    derivatives = {keys.FORCES, keys.STRESS} & set(loss_fn.required_properties)
    if derivatives and not model.do_derivatives:
        raise TrainingConfigError("force or stress losses need do_derivatives: true")
    return model, loss_fn, dtype


def _resume(
    path: Path,
    config: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    announce: bool,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The loop state and best weights after the checkpoint at ``path`` (loaded
    into ``model``, ``optimizer`` and ``scheduler``), or those of a fresh run."""
    if not path.exists():
        state = {
            "epoch": 0,
            "best_value": math.inf,
            "best_epoch": 0,
            "best_metrics": {},
            "elapsed_s": 0.0,
        }
        return state, copy.deepcopy(model.state_dict())
    checkpoint = read_checkpoint(path, config)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if announce:
        print(
            f"resuming {path.parent} after epoch {checkpoint['state']['epoch']}",
            flush=True,
        )
    return checkpoint["state"], checkpoint["best_model"]


def _device(name: str) -> torch.device:
    """The config's device; ``auto`` is CUDA where there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _on_cpu(graphs: Sequence[AtomicGraph], dtype: torch.dtype) -> list[AtomicGraph]:
    """``graphs`` in the model's dtype, kept on the CPU until they are batched."""
    return [graph_to(graph, torch.device("cpu"), dtype) for graph in graphs]


def _learning_rate_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to `FINAL_LR_FRACTION`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return FINAL_LR_FRACTION + (1.0 - FINAL_LR_FRACTION) * cosine


def _scheduler(
    optimizer: torch.optim.Optimizer, warmup_fraction: float, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """`_learning_rate_factor` over ``total_steps``, stepped once per batch."""
    warmup_steps = max(1, int(warmup_fraction * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _learning_rate_factor(step, warmup_steps, total_steps)
    )


def _train_epoch(
    step: _Optimization,
    batches: Iterable[AtomicGraph],
    epoch: int,
    distributed: Distributed,
    bar: tqdm | None,
    checkpoint_path: Path,
) -> Row:
    """One pass over ``batches``: the log row's epoch, learning rate and mean
    training losses (over every rank's batches)."""
    loss_sum, num_batches = 0.0, 0
    term_sums: dict[str, float] = {}
    for batch in batches:
        step.optimizer.zero_grad(set_to_none=True)
        predictions = step.trained(batch, step.compute_forces, step.compute_stress)
        total, terms = step.loss_fn(step.model, batch, predictions)
        if not torch.isfinite(total):
            raise FloatingPointError(
                f"epoch {epoch}: the loss is {total.item()}; lower learning_rate or "
                f"set grad_clip_norm. {checkpoint_path} holds the last good epoch"
            )
        total.backward()
        if step.grad_clip_norm is not None:
            nn.utils.clip_grad_norm_(step.parameters, float(step.grad_clip_norm))
        step.optimizer.step()
        step.scheduler.step()
        loss_sum += total.item()
        for term, value in terms.items():
            term_sums[term] = term_sums.get(term, 0.0) + value.item()
        num_batches += 1
        if bar is not None:
            bar.update(1)
    all_batches = distributed.sum(num_batches)
    row: Row = {
        "epoch": epoch,
        "learning_rate": step.optimizer.param_groups[0]["lr"],
        "train_loss": distributed.sum(loss_sum) / all_batches,
    }
    for term, value in term_sums.items():
        row[f"train_{term}"] = distributed.sum(value) / all_batches
    return row


def _validate(
    model: nn.Module,
    graphs: Sequence[AtomicGraph],
    loss_fn: TotalLoss,
    training: Mapping[str, Any],
    device: torch.device,
) -> tuple[dict[str, float], float]:
    """Validation errors and loss, in eval mode (no graph kept for second
    derivatives)."""
    model.eval()
    try:
        evaluation = measure_errors(
            model,
            graphs,
            batch_size=training["batch_size"],
            device=device,
            loss_fn=loss_fn,
        )
        metrics = evaluation.metrics()
        val_loss = evaluation.mean_loss
    finally:
        model.train()
    return metrics, val_loss


def _record_validation(
    epoch: int,
    row: Row,
    state: dict[str, Any],
    metrics: dict[str, float],
    val_loss: float,
    training: Mapping[str, Any],
) -> bool:
    """Add the validation errors to the log ``row``; True, with ``state``'s best
    epoch updated, if they beat the best so far."""
    row["val_loss"] = val_loss
    row.update({f"val_{k}": v for k, v in metrics.items() if k != "num_structures"})
    value = _selection_value(metrics, val_loss, training["best_model_metric"])
    if value < state["best_value"]:  # a NaN never is
        state.update(best_value=value, best_epoch=epoch, best_metrics=metrics)
        return True
    return False


def _selection_value(metrics: dict[str, float], val_loss: float, metric: str) -> float:
    """The number the best model minimises: ``best_model_metric``'s value."""
    return val_loss if metric == "loss" else metrics.get(metric, val_loss)


def _test_errors(
    model: nn.Module,
    config: Mapping[str, Any],
    data: TrainingData,
    dtype: torch.dtype,
    device: torch.device,
    progress: bool,
) -> dict[str, float]:
    """The errors on ``data.test`` (eV units), or none without a test set."""
    test = config["data"].get("test")
    if not test:
        return {}
    graphs = load_graphs(test, data.species, data.cutoff, data.label_keys, dtype)
    batch_size = config["architecture"]["training"]["batch_size"]
    metrics = measure_errors(
        model, graphs, batch_size=batch_size, device=device, dtype=dtype
    ).metrics()
    if progress:
        print(f"test ({test}): {format_metrics(metrics)}", flush=True)
    return metrics
