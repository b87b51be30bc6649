"""`train`: a YAML-shaped config → a trained ``OUTDIR/model.safetensors``.

The steps, in order: read the data → graphs at the model's cutoff → training-data
statistics → the model and its loss, as its kind of run makes them (a fresh
model, a fine-tuned one, an LLPR wrapper: `ModelSetup`) → Adam with warm-up and
cosine decay (`pes_calc.train.schedule`) → per epoch (`pes_calc.train.epoch`):
batches, validation, CSV log, checkpoint, best model → the best model with its
test errors. With ``ema_decay`` set, validation, the best model and the saved
model use the moving average of the weights (`pes_calc.train.ema`). Rerunning on
the same OUTDIR resumes from the checkpoint; the batch order depends only on
(seed, epoch), so a resumed run retraces an uninterrupted one exactly.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pes_calc import keys
from pes_calc.build import DTYPES
from pes_calc.graph import AtomicGraph, batch_order, graph_to, iterate_batches
from pes_calc.llpr import LLPR
from pes_calc.potential import Potential
from pes_calc.train.checkpoint import (
    read_log,
    resume,
    save_best,
    write_checkpoint,
    write_log,
)
from pes_calc.train.config import TrainingConfigError, normalise_config
from pes_calc.train.data import load_graphs
from pes_calc.train.distributed import Distributed
from pes_calc.train.ema import WeightEMA, evaluation_weights
from pes_calc.train.epoch import Optimization, record_validation, train_epoch, validate
from pes_calc.train.evaluation import measure_errors
from pes_calc.train.llpr_training import LLPRSetup
from pes_calc.train.losses import TotalLoss
from pes_calc.train.progress import format_metrics, progress_bar, report_epoch
from pes_calc.train.schedule import FINAL_LR_FRACTION, adam, scheduler
from pes_calc.train.setup import (
    FineTuneSetup,
    FreshSetup,
    ModelSetup,
    TrainingData,
    read_training_data,
)

__all__ = ["FINAL_LR_FRACTION", "TrainResult", "model_setup", "train"]


@dataclass
class TrainResult:
    """What a finished run produced."""

    model: Potential | LLPR
    model_path: Path
    best_epoch: int
    val_metrics: dict[str, float]
    test_metrics: dict[str, float]
    training_time_s: float


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
    optimizer = adam(parameters, training)
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
    lr_scheduler = scheduler(optimizer, training["warmup_fraction"], total_steps)
    # the average of the (unwrapped) model's weights, from its initial ones
    ema_decay = training.get("ema_decay")  # llpr runs have none
    ema = None if ema_decay is None else WeightEMA(model, ema_decay)

    # resume: weights, optimizer, schedule, averages, best weights and the log
    checkpoint_path = outdir / "checkpoint.pt"
    model_path = outdir / "model.safetensors"
    log_path = outdir / "train.csv"
    state, best_state = resume(
        checkpoint_path,
        config,
        model,
        optimizer,
        lr_scheduler,
        ema,
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
    step = Optimization(
        trained,
        model,
        loss_fn,
        parameters,
        optimizer,
        lr_scheduler,
        training["grad_clip_norm"],
        compute_forces=keys.FORCES in loss_fn.required_properties,
        compute_stress=keys.STRESS in loss_fn.required_properties,
        ema=ema,
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
        row = train_epoch(step, batches, epoch, distributed, bar, checkpoint_path)

        validating = epoch % training["log_interval"] == 0 or epoch == num_epochs
        improved = False
        if validating and distributed.is_main:
            with evaluation_weights(ema):
                metrics, val_loss = validate(
                    fitted, val_graphs, loss_fn, training, device
                )
            improved = record_validation(epoch, row, state, metrics, val_loss, training)
            report_epoch(epoch, row["train_loss"], metrics, bar, progress)
        # rank 0 validates; every rank keeps the same best weights
        if validating and distributed.broadcast_flag(improved):
            with evaluation_weights(ema):
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
                    lr_scheduler,
                    state,
                    ema,
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


def _device(name: str) -> torch.device:
    """The config's device; ``auto`` is CUDA where there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _on_cpu(graphs: Sequence[AtomicGraph], dtype: torch.dtype) -> list[AtomicGraph]:
    """``graphs`` in the model's dtype, kept on the CPU until they are batched."""
    return [graph_to(graph, torch.device("cpu"), dtype) for graph in graphs]


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
