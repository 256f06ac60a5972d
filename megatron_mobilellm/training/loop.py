"""The training loop: steps, bad-step handling, logging, validation, checkpoints and the reasons to stop.

``Trainer.train`` reads top to bottom like Megatron's ``train()``: take a step, account for it, then log, validate,
save and check whether to exit, each by name.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_mobilellm.checkpoint_layout import tag_for
from megatron_mobilellm.data.builder import build_loader
from megatron_mobilellm.errors import UserError
from megatron_mobilellm.training.checkpointing import TrainState, save_checkpoint
from megatron_mobilellm.training.config import RunConfig
from megatron_mobilellm.training.distributed import DeferredAnyRank, all_ranks_mean
from megatron_mobilellm.training.guard import BadStepPolicy, NonFiniteGradGuard
from megatron_mobilellm.training.launcher import watch_launcher
from megatron_mobilellm.training.metrics import MetricsWriter, Throughput, flops_per_token, max_memory_gib, perplexity


class TrainingStopped(UserError, RuntimeError):
    """Too many consecutive bad steps; the message names the iteration and the samples involved."""


class StopSignal:
    """SIGTERM/SIGUSR1 (what SLURM sends before a preemption or the time limit) ask for a save and a clean exit; so
    does the death of the launcher (``kill -TERM`` of ``deepspeed`` does not reach the ranks)."""

    def __init__(self) -> None:
        self.received: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)
        watch_launcher(self._launcher_died)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def _launcher_died(self, reason: str) -> None:
        self.received = self.received or reason


@dataclass
class StepResult:
    local_loss: torch.Tensor
    """This rank's mean loss over the step's micro-batches (a device tensor)."""
    global_loss: float
    """The mean over all ranks, when the spike check computed it (else NaN)."""


def train_step(engine, batches, accum: int, device: torch.device, spike_policy: BadStepPolicy | None = None,
               inject_nan: bool = False, guard: NonFiniteGradGuard | None = None) -> StepResult:
    """One optimizer step: ``accum`` micro-batches of forward/backward, DeepSpeed steps at the boundary.

    With ``spike_policy``, the ranks agree on the step's mean loss before the last backward; a spike is vetoed by
    making that loss NaN, so the engine's own overflow handling discards the step. ``guard`` (fp32 ZeRO-0) measures
    the reduced gradients' norm after the last backward, before DeepSpeed clips them.
    """
    total = torch.zeros((), device=device)
    global_loss = float("nan")
    for micro in range(accum):
        batch = next(batches)
        loss = engine(batch["tokens"].to(device, non_blocking=True), batch["labels"].to(device, non_blocking=True))
        if inject_nan and micro == 0:
            loss = loss * float("nan")
        total += loss.detach().float()
        if micro == accum - 1 and spike_policy is not None:
            global_loss = all_ranks_mean(total / accum)
            if spike_policy.is_spike(global_loss):
                loss = loss * float("nan")
        engine.backward(loss)
        if micro == accum - 1 and guard is not None:
            guard.measure()
        engine.step()
    return StepResult(total / accum, global_loss)


@torch.no_grad()
def evaluate(engine, dataset, eval_iters: int, global_batch_size: int, micro_batch_size: int,
             device: torch.device) -> float:
    """Mean loss over the first ``eval_iters`` global batches of the validation split (the same every time)."""
    engine.eval()
    loader = build_loader(dataset, 0, micro_batch_size, dist.get_rank(), dist.get_world_size(), 0)
    steps = eval_iters * global_batch_size // (micro_batch_size * dist.get_world_size())
    total = torch.zeros((), device=device)
    batches = iter(loader)
    for _ in range(steps):
        batch = next(batches)
        total += engine(batch["tokens"].to(device), batch["labels"].to(device)).float()
    engine.train()
    return all_ranks_mean(total / steps)


@dataclass
class LogInterval:
    """This rank's losses of the applied updates since the last log line."""

    loss_sum: torch.Tensor
    applied: int = 0

    def mean_over_ranks(self) -> float:
        return all_ranks_mean(self.loss_sum / max(self.applied, 1)) if self.applied else float("nan")

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.applied = 0


class Trainer:
    """Runs the loop over a built engine and datasets; ``state`` is what a checkpoint saves and a resume restores."""

    def __init__(self, run: RunConfig, engine, scheduler, guard, datasets: dict, writer: MetricsWriter,
                 device: torch.device, state: TrainState):
        self.run, self.cfg = run, run.training
        self.engine, self.scheduler, self.guard = engine, scheduler, guard
        self.datasets, self.writer, self.device, self.state = datasets, writer, device, state
        self.accum = engine.gradient_accumulation_steps()
        self.policy = BadStepPolicy(self.cfg.max_skipped_steps, self.cfg.loss_spike_factor)
        self.last_saved = state.iteration

    def train(self) -> None:
        cfg, state = self.cfg, self.state
        rank, world = dist.get_rank(), dist.get_world_size()
        batches = iter(build_loader(self.datasets["train"], state.consumed_samples, cfg.micro_batch_size, rank,
                                    world, cfg.num_workers))
        validating = bool(cfg.eval_iters)
        if validating and state.iteration == 0:  # a baseline point for the validation curve
            self.validate()
        stop, started, agree = StopSignal(), time.time(), DeferredAnyRank(self.device)
        throughput = Throughput(cfg.global_batch_size * cfg.seq_length,
                                flops_per_token(self.run.model, cfg.seq_length), cfg.peak_tflops, self.device)
        interval = LogInterval(torch.zeros((), device=self.device))
        while state.iteration < cfg.train_iters:
            lr = self.scheduler.get_last_lr()[0]
            step = train_step(self.engine, batches, self.accum, self.device,
                              self.policy if cfg.loss_spike_factor else None,
                              inject_nan=state.iteration + 1 in cfg.inject_nan_loss_at and rank == 0,
                              guard=self.guard)
            state.iteration += 1
            state.consumed_samples += cfg.global_batch_size
            throughput.iters += 1
            self.account(step, interval)
            if state.iteration % cfg.log_interval == 0:
                self.log(interval.mean_over_ranks(), lr, throughput.measure())
                interval.reset()
            if validating and state.iteration % cfg.eval_interval == 0:
                self.validate()
            if cfg.save and cfg.save_interval and state.iteration % cfg.save_interval == 0:
                self.save()
            reason = self.exit_reason(stop, started, agree)
            if reason:
                agree.drain()
                if cfg.save and self.last_saved != state.iteration:
                    self.save()
                saved = f"checkpoint {cfg.save}/{tag_for(state.iteration)}" if cfg.save else \
                    "nothing saved (no --save)"
                self.writer.line(f"exiting at iteration {state.iteration} after {reason}; {saved}")
                return
        agree.drain()
        if validating and state.iteration % cfg.eval_interval:
            self.validate()
        if cfg.save and self.last_saved != state.iteration:
            self.save()
        self.writer.line(f"done: {state.iteration} iterations, {state.consumed_samples} samples, "
                         f"{self.policy.total} skipped updates")

    def account(self, step: StepResult, interval: LogInterval) -> None:
        """Count the step as applied or skipped; stop after too many skipped in a row."""
        applied = self.engine.was_step_applied() and not (self.guard and self.guard.skipped)
        self.policy.record(applied, step.global_loss)
        if applied:
            interval.loss_sum += step.local_loss
            interval.applied += 1
            return
        state, policy = self.state, self.policy
        first = state.consumed_samples - self.cfg.global_batch_size
        self.writer.line(f"skipped the update of iteration {state.iteration} (loss {all_ranks_mean(step.local_loss):.4E}"
                         f", grad norm {self.grad_norm()}); global samples [{first}, "
                         f"{state.consumed_samples}); {policy.consecutive} in a row, {policy.total} in total")
        if policy.exhausted:
            raise TrainingStopped(
                f"{policy.consecutive} consecutive updates skipped (--max-skipped-steps {self.cfg.max_skipped_steps})"
                f", the last at iteration {state.iteration}, global samples [{first}, {state.consumed_samples})"
                f" of the train split; inspect that data, lower --lr, or resume from an earlier checkpoint")

    def grad_norm(self) -> float:
        """The last step's global gradient norm before clipping: DeepSpeed's, or the guard's in fp32 ZeRO-0 where
        DeepSpeed keeps none."""
        norm = self.engine.get_global_grad_norm()
        if norm is None and self.guard is not None:
            norm = self.guard.grad_norm
        return float(norm if norm is not None else float("nan"))

    def log(self, loss: float, lr: float, speed: dict[str, float]) -> None:
        state, cfg = self.state, self.cfg
        grad_norm = self.grad_norm()
        mem = max_memory_gib(self.device)
        self.writer.line(
            f" iteration {state.iteration:8d}/{cfg.train_iters:8d} | consumed samples {state.consumed_samples:12d} | "
            f"consumed tokens {state.consumed_samples * cfg.seq_length:14d} | "
            f"elapsed time per iteration (ms) {speed['ms_per_iter']:.1f} | learning rate {lr:.6E} | "
            f"lm loss {loss:.9E} | grad norm {grad_norm:.4f} | skipped iterations {self.policy.total} | "
            f"tokens/s {speed['tokens_per_sec']:.0f} (per GPU {speed['tokens_per_sec_per_gpu']:.0f}) | "
            f"TFLOP/s/GPU {speed['tflops_per_gpu']:.2f} | MFU {100 * speed['mfu']:.2f}% | mem max {mem:.2f} GiB")
        self.writer.scalars(state.iteration, {
            "train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
            "train/skipped_steps": self.policy.total,
            "train/tokens_per_sec": speed["tokens_per_sec"], "train/tflops_per_gpu": speed["tflops_per_gpu"],
            "train/mfu": speed["mfu"], "train/mem_max_allocated_gib": mem})

    def validate(self, split: str = "valid", label: str = "validation") -> None:
        cfg = self.cfg
        loss = evaluate(self.engine, self.datasets[split], cfg.eval_iters, cfg.global_batch_size,
                        cfg.micro_batch_size, self.device)
        self.writer.line(f" {label} at iteration {self.state.iteration} | lm loss {loss:.6E} | "
                         f"lm loss PPL {perplexity(loss):.4f}")
        self.writer.scalars(self.state.iteration, {f"{split}/loss": loss, f"{split}/ppl": perplexity(loss)})

    def evaluate_only(self) -> None:
        """``--skip-train``: the loaded weights on the validation and test splits, logged at the loaded iteration."""
        for split, label in (("valid", "validation"), ("test", "test")):
            if self.datasets[split] is None:
                self.writer.line(f" {label} at iteration {self.state.iteration}: no {split} documents (--split)")
            else:
                self.validate(split, label)
        self.writer.line(f"--skip-train: evaluated iteration {self.state.iteration}; no step taken, nothing saved")

    def save(self) -> None:
        save_checkpoint(self.engine, self.cfg.save, self.state, self.run.model, self.run.cli_args, self.cfg.keep_last)
        self.last_saved = self.state.iteration

    def exit_reason(self, stop: StopSignal, started: float, agree: DeferredAnyRank) -> str | None:
        """Why to stop now, agreed by all ranks: a signal on any rank or the time budget (seen by all ranks one
        iteration after the first saw it, so that no iteration waits on the GPU to agree), or --exit-interval."""
        cfg = self.cfg
        minutes = (time.time() - started) / 60
        out_of_time = bool(cfg.exit_duration_in_mins) and minutes >= cfg.exit_duration_in_mins
        signalled, timed_out = agree([stop.received is not None, out_of_time])
        if signalled:
            return "a stop signal" + (f" ({stop.received})" if stop.received else " on another rank")
        if timed_out:
            return f"--exit-duration-in-mins {cfg.exit_duration_in_mins}"
        if cfg.exit_interval and self.state.iteration % cfg.exit_interval == 0:
            return f"--exit-interval {cfg.exit_interval}"
        return None
