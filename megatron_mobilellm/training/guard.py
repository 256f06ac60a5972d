"""Bad-step handling: skip an update whose loss or gradients are not finite (or whose loss spikes), count it, and
stop after too many in a row.

DeepSpeed's ZeRO 1–3 optimizers and its bf16 optimizer already discard a step whose global gradient norm is not
finite (weights and Adam moments untouched, LR schedule not advanced). Plain data parallel in fp32 (ZeRO-0 without
bf16) applies whatever it gets, so ``NonFiniteGradGuard`` gives it the same behaviour. A loss spike is turned into
the same case on purpose: the last micro-batch's loss is multiplied by NaN before its backward, so every path
discards the step the same way.
"""

from __future__ import annotations

import math
from collections import deque

import torch


def _grads(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


class NonFiniteGradGuard:
    """Drops an fp32 ZeRO-0 step with non-finite gradients (gradients there are already data-parallel reduced, so
    every rank decides the same), and keeps the step's global gradient norm, which DeepSpeed does not in this mode.

    ``measure()`` takes the norm before DeepSpeed clips (as Megatron logs it); the step hook judges that norm, or
    measures itself if nothing did (clipping keeps a non-finite norm non-finite, so the decision is the same).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler) -> None:
        self.skipped = False
        self.grad_norm: float | None = None
        self._measured: float | None = None
        self.optimizer, self.scheduler = optimizer, scheduler
        optimizer.register_step_pre_hook(self._check)

    def measure(self) -> None:
        grads = _grads(self.optimizer)
        self._measured = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def _check(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        if self._measured is None:
            self.measure()
        self.grad_norm, self._measured = self._measured, None
        self.skipped = not math.isfinite(self.grad_norm)
        if self.skipped:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            for p in params:
                p.grad = None  # AdamW leaves parameters without gradients (and their moments) alone
            self.scheduler.hold_next_step = True


class BadStepPolicy:
    """Counts skipped updates and decides when to stop; optionally flags loss spikes over a running mean."""

    def __init__(self, max_consecutive: int, spike_factor: float | None, window: int = 50, warmup: int = 20):
        self.max_consecutive, self.spike_factor = max_consecutive, spike_factor
        self.recent: deque[float] = deque(maxlen=window)
        self.warmup = warmup
        self.total = 0
        self.consecutive = 0

    def is_spike(self, loss: float) -> bool:
        if not self.spike_factor or len(self.recent) < self.warmup:
            return False
        return loss > self.spike_factor * (sum(self.recent) / len(self.recent))

    def record(self, applied: bool, loss: float) -> None:
        if applied:
            self.consecutive = 0
            if math.isfinite(loss):
                self.recent.append(loss)
        else:
            self.total += 1
            self.consecutive += 1

    @property
    def exhausted(self) -> bool:
        return self.consecutive >= self.max_consecutive
