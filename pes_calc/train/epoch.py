"""One epoch of the training loop: the optimizer steps over its batches, the
validation errors, and whether they beat the best so far.

An epoch's log row holds its number, learning rate, mean training losses and, on
validation epochs, the validation loss and errors (eV units); the loop adds the
run's elapsed time (s).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pes_calc.graph import AtomicGraph
from pes_calc.train.distributed import Distributed
from pes_calc.train.ema import WeightEMA
from pes_calc.train.evaluation import measure_errors
from pes_calc.train.losses import TotalLoss

__all__ = [
    "Optimization",
    "Row",
    "record_validation",
    "selection_value",
    "train_epoch",
    "validate",
]

# an epoch's log row: epoch, learning rate, losses, validation errors, time (s)
Row = dict[str, float]


@dataclass
class Optimization:
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
    ema: WeightEMA | None = None  # updated after every optimizer step


def train_epoch(
    step: Optimization,
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
        if step.ema is not None:
            step.ema.update()
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


def validate(
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


def record_validation(
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
    value = selection_value(metrics, val_loss, training["best_model_metric"])
    if value < state["best_value"]:  # a NaN never is
        state.update(best_value=value, best_epoch=epoch, best_metrics=metrics)
        return True
    return False


def selection_value(metrics: dict[str, float], val_loss: float, metric: str) -> float:
    """The number the best model minimises: ``best_model_metric``'s value."""
    return val_loss if metric == "loss" else metrics.get(metric, val_loss)
