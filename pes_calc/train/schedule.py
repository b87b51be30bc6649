"""The optimizer and its learning-rate schedule: Adam, with a linear warm-up to
``learning_rate`` over ``warmup_fraction`` of the run's steps, then cosine decay
to `FINAL_LR_FRACTION` of it, stepped once per batch."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["FINAL_LR_FRACTION", "adam", "learning_rate_factor", "scheduler"]

# the learning rate decays along a cosine to this fraction of its peak
FINAL_LR_FRACTION = 0.01


def adam(
    parameters: Sequence[nn.Parameter], training: Mapping[str, Any]
) -> torch.optim.Adam:
    """Adam over ``parameters`` with the training section's rate and decay."""
    return torch.optim.Adam(
        parameters,
        lr=training["learning_rate"],
        weight_decay=training["weight_decay"] or 0.0,
    )


def learning_rate_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to `FINAL_LR_FRACTION`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return FINAL_LR_FRACTION + (1.0 - FINAL_LR_FRACTION) * cosine


def scheduler(
    optimizer: torch.optim.Optimizer, warmup_fraction: float, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """`learning_rate_factor` over ``total_steps``, stepped once per batch."""
    warmup_steps = max(1, int(warmup_fraction * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, warmup_steps, total_steps)
    )
