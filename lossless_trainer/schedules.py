"""Ready learning-rate schedules. Any `torch.optim.lr_scheduler` works with the Trainer."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["WarmupCosine"]


class WarmupCosine(LRScheduler):
    """Linear warmup from 0 to each group's base LR, then cosine decay to a floor.

    Stepped once per optimizer step. Its state is plain numbers, so it checkpoints with
    ``weights_only`` loading.

    Args:
        optimizer: The optimizer whose groups' LRs are scheduled.
        warmup_steps: Steps of linear warmup (0 for none).
        total_steps: Steps at which the cosine reaches the floor; it stays there after.
        min_lr_ratio: The floor, as a fraction of each group's base LR.
        last_epoch: The index of the last step taken, as for every torch scheduler;
            -1 (the default) starts the schedule from the beginning.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                 min_lr_ratio: float = 0.0, last_epoch: int = -1) -> None:
        if warmup_steps < 0 or total_steps <= warmup_steps:
            raise ValueError(
                f"WarmupCosine needs 0 <= warmup_steps < total_steps, got {warmup_steps} "
                f"and {total_steps}"
            )
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be within [0, 1], got {min_lr_ratio}")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The multiplier of the base LR after `step` steps."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine

    def get_lr(self) -> list[float]:
        factor = self.factor(self.last_epoch)
        return [base * factor for base in self.base_lrs]
