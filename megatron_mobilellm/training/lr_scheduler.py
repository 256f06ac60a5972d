"""Iteration-based learning-rate schedules: warmup from 0, then cosine / linear / constant / WSD.

Handed to DeepSpeed, which steps it after every optimizer step and saves/restores its state in checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch

from megatron_mobilellm.training.config import ScheduleConfig


def lr_at(iteration: int, *, lr: float, min_lr: float, warmup_iters: int, decay_iters: int, style: str,
          wsd_decay_iters: int = 0) -> float:
    """Learning rate for the update that follows ``iteration`` completed updates."""
    if warmup_iters and iteration < warmup_iters:
        return lr * iteration / warmup_iters  # linear from 0, the seed's warmup
    if style == "constant":
        return lr
    if style == "wsd":  # warmup, stable at lr, then a linear decay to min_lr over the last wsd_decay_iters
        decay_start = decay_iters - wsd_decay_iters
        if iteration < decay_start:
            return lr
        frac = min(1.0, (iteration - decay_start) / max(1, wsd_decay_iters))
        return lr - (lr - min_lr) * frac
    if iteration >= decay_iters:
        return min_lr
    frac = (iteration - warmup_iters) / max(1, decay_iters - warmup_iters)
    if style == "linear":
        return lr - (lr - min_lr) * frac
    if style == "cosine":  # half cosine from lr down to min_lr
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"unknown --lr-decay-style {style!r}")


class LRScheduler:
    """Sets every param group's lr from ``lr_at``; its state is the number of completed updates."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: ScheduleConfig):
        self.optimizer, self.schedule = optimizer, asdict(schedule)
        self.iteration = 0
        self.hold_next_step = False  # set when an update was discarded behind DeepSpeed's back
        self._apply()

    def _apply(self) -> None:
        value = lr_at(self.iteration, **self.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = value

    def step(self, increment: int = 1) -> None:
        if self.hold_next_step:
            self.hold_next_step = False
            return
        self.iteration += increment
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = state["iteration"]
        self._apply()
