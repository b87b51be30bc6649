"""An exponential moving average (EMA) of a model's weights: with
``training.ema_decay`` set, the weights a run validates, selects as its best and
saves (nequip's ``EMALightningModule``, MACE's ``ema_decay``).

After the k-th optimizer step (k = 1, 2, …) every average moves towards its
parameter p,

    ema ← d_k · ema + (1 − d_k) · p,    d_k = min(ema_decay, (1 + k) / (10 + k)),

starting from the weights before the first step. The warm-up in d_k (torch-ema's,
which nequip and MACE use) keeps those initial weights from dominating the average
of a short run: d_k passes 0.9 after 80 steps and 0.99 after 890. Only trainable
parameters are averaged; buffers and frozen parameters, which no optimizer step
changes, are the model's own. The averages have the dtype and device of their
parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["WeightEMA", "evaluation_weights"]


class WeightEMA:
    """The EMA of ``model``'s trainable parameters (those with ``requires_grad``
    when it is made), updated by `update` after each optimizer step.

    Under DDP, give it the unwrapped module: every rank holds the same weights, so
    every rank holds the same averages.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must lie between 0 and 1, got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self._parameters = {
            name: parameter
            for name, parameter in model.named_parameters()
            if parameter.requires_grad
        }
        self.averages = {
            name: parameter.detach().clone()
            for name, parameter in self._parameters.items()
        }

    def decay_at(self, update: int) -> float:
        """d_k of the ``update``-th update (1 for the first): the warm-up, capped
        at ``decay``."""
        return min(self.decay, (1 + update) / (10 + update))

    @torch.no_grad()
    def update(self) -> None:
        """Move every average towards its parameter (call after each step)."""
        self.num_updates += 1
        decay = self.decay_at(self.num_updates)
        for name, parameter in self._parameters.items():
            self.averages[name].mul_(decay).add_(parameter, alpha=1.0 - decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averages in the model's parameters; the trained ones back after."""
        trained = {
            name: parameter.detach().clone()
            for name, parameter in self._parameters.items()
        }
        self._copy_into_parameters(self.averages)
        try:
            yield
        finally:
            self._copy_into_parameters(trained)

    @torch.no_grad()
    def _copy_into_parameters(self, values: Mapping[str, torch.Tensor]) -> None:
        for name, parameter in self._parameters.items():
            parameter.copy_(values[name])

    def state_dict(self) -> dict[str, Any]:
        """The decay, the update count and the averages (for a checkpoint)."""
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "averages": {name: a.clone() for name, a in self.averages.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state_dict`'s ``state`` (written for the same model)."""
        averages = state["averages"]
        if set(averages) != set(self.averages):
            raise ValueError(
                "the checkpoint's weight averages are of other parameters: "
                f"{sorted(set(averages) ^ set(self.averages))}"
            )
        for name, average in self.averages.items():
            average.copy_(averages[name])
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])


def evaluation_weights(
    ema: WeightEMA | None,
) -> contextlib.AbstractContextManager[None]:
    """The weights to validate and save: the averages of ``ema``, or the trained
    weights themselves without one."""
    return contextlib.nullcontext() if ema is None else ema.applied()
