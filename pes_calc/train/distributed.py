"""Data-parallel training under torchrun: rank, world size and the few
collectives the trainer needs (sums of epoch totals, rank 0's decisions)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from pes_calc.train.config import TrainingConfigError

__all__ = ["Distributed"]


class Distributed:
    """Rank and world size; one process unless ``distributed: true`` under torchrun.

    With ``enabled`` false every method is the single-process identity, so the
    trainer calls them unconditionally.
    """

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
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that validates and writes files."""
        return self.rank == 0

    def sum(self, value: float) -> float:
        """``value`` summed over all ranks (float64)."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.item()

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank."""
        if not self.enabled:
            return flag
        tensor = torch.tensor([int(flag)])
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.enabled:
            dist.barrier()
