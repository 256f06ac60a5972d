"""Pretrain a MobileLLM under DeepSpeed ZeRO.

    deepspeed [--hostfile hosts] --module megatron_mobilellm.pretrain --model-size 125M --data-path PREFIX \\
        --micro-batch-size 32 --global-batch-size 256 --train-iters 480000 --lr 5e-4 \\
        --deepspeed_config ds_configs/zero2.json --save ckpt --load ckpt --tensorboard-dir tb

Also runs under ``torchrun`` and as plain ``python -m megatron_mobilellm.pretrain`` (one process). Relaunching the
same command (``--load`` = ``--save``) continues from the newest complete checkpoint; SIGTERM/SIGUSR1 save and
exit 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
import warnings

import torch
import torch.distributed as dist

from megatron_mobilellm.config import ModelConfig
from megatron_mobilellm.convert.ds_checkpoint import CheckpointError
from megatron_mobilellm.data.builder import build_datasets, build_loader, open_datasets, parse_data_path
from megatron_mobilellm.data.gpt_dataset import parse_split
from megatron_mobilellm.data.indexed_dataset import DatasetFormatError
from megatron_mobilellm.model import MobileLLM
from megatron_mobilellm.training.arguments import ConfigError, data_parallel_checks, model_config, parse_args
from megatron_mobilellm.training.checkpointing import (TrainState, initial_weights, load_checkpoint, plan_resume,
                                                       prepare_universal, save_checkpoint)
from megatron_mobilellm.training.ds_config import build_ds_config
from megatron_mobilellm.training.guard import BadStepPolicy, NonFiniteGradGuard
from megatron_mobilellm.training.lr_scheduler import LRScheduler
from megatron_mobilellm.training.metrics import (MetricsWriter, detect_peak_tflops, flops_per_token,
                                                 max_memory_gib, perplexity)
from megatron_mobilellm.training.optimizer import build_optimizer
from megatron_mobilellm.training.zero_overflow import fuse_grad_norm, fuse_overflow_check


class TrainingStopped(RuntimeError):
    """Too many consecutive bad steps; the message names the iteration and the samples involved."""


def init_distributed() -> torch.device:
    """Join the process group the launcher describes; a plain ``python -m`` run becomes a world of one."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)  # our own log lines say what matters
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return device


def all_ranks_mean(value: torch.Tensor) -> float:
    value = value.detach().float().clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


class StopSignal:
    """SIGTERM/SIGUSR1 (what SLURM sends before a preemption or the time limit) ask for a save and a clean exit."""

    def __init__(self) -> None:
        self.received: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name


def train_step(engine, batches, accum: int, device: torch.device, spike=None, inject_nan: bool = False):
    """One optimizer step: ``accum`` micro-batches of forward/backward, DeepSpeed steps at the boundary.

    ``spike(local_mean_loss) -> bool`` may veto the update before the last backward: the loss is then made NaN so
    the engine's own overflow handling discards the step. Returns this rank's mean loss (a device tensor).
    """
    total = torch.zeros((), device=device)
    for micro in range(accum):
        batch = next(batches)
        loss = engine(batch["tokens"].to(device, non_blocking=True), batch["labels"].to(device, non_blocking=True))
        if inject_nan and micro == 0:
            loss = loss * float("nan")
        total += loss.detach().float()
        if micro == accum - 1 and spike is not None and spike(total / accum):
            loss = loss * float("nan")
        engine.backward(loss)
        engine.step()
    return total / accum


@torch.no_grad()
def evaluate(engine, dataset, args: argparse.Namespace, device: torch.device) -> float:
    """Mean loss over the first ``eval_iters`` global batches of the validation split (the same every time)."""
    engine.eval()
    loader = build_loader(dataset, 0, args.micro_batch_size, dist.get_rank(), dist.get_world_size(), 0)
    steps = args.eval_iters * args.global_batch_size // (args.micro_batch_size * dist.get_world_size())
    total = torch.zeros((), device=device)
    batches = iter(loader)
    for _ in range(steps):
        batch = next(batches)
        total += engine(batch["tokens"].to(device), batch["labels"].to(device)).float()
    engine.train()
    return all_ranks_mean(total / steps)


def build_engine(args: argparse.Namespace, cfg: ModelConfig, device: torch.device, ds_config: dict,
                 weights: dict[str, torch.Tensor] | None = None):
    """The DeepSpeed engine around a freshly initialised model (or one holding ``weights``), the LR scheduler,
    and the fp32 ZeRO-0 gradient guard where DeepSpeed has none."""
    import deepspeed

    torch.manual_seed(args.seed)
    with torch.device(device):
        model = MobileLLM(cfg, attention_backend=args.attention_backend, loss_chunk_size=args.loss_chunk_size)
    model.init_weights(torch.Generator(device).manual_seed(args.seed))
    if weights is not None:
        model.load_state_dict(weights)
    model.set_activation_checkpointing(args.recompute_activations)
    if args.compile:
        model.compile(args.compile, cuda_graphs=args.cuda_graphs)
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
    optimizer = build_optimizer(model, args, device, offload)
    schedule = dict(lr=args.lr, min_lr=args.min_lr, warmup_iters=args.lr_warmup_iters,
                    decay_iters=args.lr_decay_iters or args.train_iters, style=args.lr_decay_style,
                    wsd_decay_iters=args.lr_wsd_decay_iters or max(1, args.train_iters // 5))
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                                   lr_scheduler=lambda opt: LRScheduler(opt, **schedule))
    fuse_overflow_check(engine.optimizer)
    fuse_grad_norm(engine.optimizer)
    plain_fp32 = engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()
    guard = NonFiniteGradGuard(optimizer, scheduler) if plain_fp32 else None
    return engine, scheduler, guard


class Throughput:
    """Tokens/s, TFLOP/s per GPU and MFU over the iterations since the last log line."""

    def __init__(self, cfg: ModelConfig, args: argparse.Namespace, device: torch.device):
        self.tokens_per_iter = args.global_batch_size * args.seq_length
        self.flops_per_token = flops_per_token(cfg, args.seq_length)
        self.peak = args.peak_tflops or detect_peak_tflops(device)
        self.device = device
        self.start, self.iters = time.perf_counter(), 0

    def measure(self) -> dict[str, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - self.start
        world = dist.get_world_size()
        tokens_per_sec = self.tokens_per_iter * self.iters / elapsed
        tflops = tokens_per_sec * self.flops_per_token / world / 1e12
        out = {"ms_per_iter": 1000 * elapsed / max(self.iters, 1), "tokens_per_sec": tokens_per_sec,
               "tokens_per_sec_per_gpu": tokens_per_sec / world, "tflops_per_gpu": tflops,
               "mfu": tflops / self.peak if self.peak else 0.0}
        self.start, self.iters = time.perf_counter(), 0
        return out


def log_train(writer: MetricsWriter, state: TrainState, args, loss: float, lr: float, grad_norm: float,
              skipped: int, speed: dict[str, float], device: torch.device) -> None:
    mem = max_memory_gib(device)
    writer.line(
        f" iteration {state.iteration:8d}/{args.train_iters:8d} | consumed samples {state.consumed_samples:12d} | "
        f"consumed tokens {state.consumed_samples * args.seq_length:14d} | "
        f"elapsed time per iteration (ms) {speed['ms_per_iter']:.1f} | learning rate {lr:.6E} | "
        f"lm loss {loss:.9E} | grad norm {grad_norm:.4f} | skipped iterations {skipped} | "
        f"tokens/s {speed['tokens_per_sec']:.0f} (per GPU {speed['tokens_per_sec_per_gpu']:.0f}) | "
        f"TFLOP/s/GPU {speed['tflops_per_gpu']:.2f} | MFU {100 * speed['mfu']:.2f}% | mem max {mem:.2f} GiB")
    writer.scalars(state.iteration, {
        "train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm, "train/skipped_steps": skipped,
        "train/tokens_per_sec": speed["tokens_per_sec"], "train/tflops_per_gpu": speed["tflops_per_gpu"],
        "train/mfu": speed["mfu"], "train/mem_max_allocated_gib": mem})


def run_validation(engine, dataset, args, state: TrainState, writer: MetricsWriter, device) -> None:
    loss = evaluate(engine, dataset, args, device)
    writer.line(f" validation at iteration {state.iteration} | lm loss {loss:.6E} | "
                f"lm loss PPL {perplexity(loss):.4f}")
    writer.scalars(state.iteration, {"valid/loss": loss, "valid/ppl": perplexity(loss)})


def check_data(args: argparse.Namespace) -> None:
    """Fail on a bad --data-path/--split before starting any process group or building a model."""
    try:
        parse_split(args.split)
        open_datasets(parse_data_path(args.data_path)[1])
    except DatasetFormatError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_cuda_graphs(args: argparse.Namespace, ds_config: dict) -> None:
    """Refuse the combinations CUDA graphs cannot run (or ran wrongly) with, before any work starts."""
    if not args.cuda_graphs:
        return
    if not torch.cuda.is_available():
        raise ConfigError("--cuda-graphs needs a CUDA device")
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        raise ConfigError(f"--cuda-graphs does not work with ZeRO-3 (--deepspeed_config {args.deepspeed_config}): "
                          "ZeRO-3 gathers parameters into new memory every step, which a recorded graph cannot follow")
    if ds_config["gradient_accumulation_steps"] > 1:
        # Measured on an H200: the second micro-batch's replay overwrites the first one's gradients, which
        # autograd kept as .grad (pytorch/pytorch#169545).
        raise ConfigError(f"--cuda-graphs needs one micro-batch per step, but --global-batch-size "
                          f"{args.global_batch_size} means {ds_config['gradient_accumulation_steps']} micro-batches "
                          "of gradient accumulation per rank; drop --cuda-graphs or raise --micro-batch-size")


def rank0_print(text: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(text, flush=True)


def pretrain(args: argparse.Namespace) -> TrainState:
    check_data(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # known before the process group: check the batch first
    accum = data_parallel_checks(args, world)
    bf16 = args.bf16 or (not args.fp32 and torch.cuda.is_available())
    ds_config = build_ds_config(args.deepspeed_config, args.micro_batch_size, accum, world, args.clip_grad, bf16)
    check_cuda_graphs(args, ds_config)
    cfg = model_config(args)
    plan = plan_resume(args.load, world, rank0_print) if args.load and not args.finetune else None
    if plan and plan.universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    device = init_distributed()
    rank = dist.get_rank()
    num_samples = {"train": args.train_iters * args.global_batch_size,
                   "valid": args.eval_iters * args.global_batch_size}
    datasets = build_datasets(args.data_path, args.split, args.seq_length, args.seed, num_samples,
                              args.data_cache_path)
    weights = initial_weights(args.load, cfg, args.finetune) if args.load and not plan else None
    engine, scheduler, guard = build_engine(args, cfg, device, ds_config, weights)
    writer = MetricsWriter(rank, args.tensorboard_dir)
    state = TrainState()
    if plan:
        if plan.universal:
            writer.line(f"{plan.tag} was saved by {plan.manifest['world_size']} ranks; loading it through "
                        f"DeepSpeed's universal checkpoint format for {world}")
            prepare_universal(args.load, plan)
        state = load_checkpoint(engine, args.load, cfg, plan)
        writer.line(f"resumed from {args.load}/{plan.tag} at iteration {state.iteration}")
    elif weights is not None:
        writer.line(f"initialised weights from {args.load}; starting at iteration 0")
    elif args.load:
        writer.line(f"no complete checkpoint in {args.load}; starting from scratch")
    writer.line(f"world size {world} | micro batch {args.micro_batch_size} | gradient accumulation {accum} | "
                f"global batch {args.global_batch_size} | precision {'bf16' if bf16 else 'fp32'} | "
                f"ZeRO stage {engine.zero_optimization_stage()} | device {device}")
    try:
        train(args, cfg, engine, scheduler, guard, datasets, state, writer, device, accum)
    finally:
        writer.close()
    # An orderly teardown: leaving gloo/NCCL threads to the interpreter's exit can abort a rank after success.
    dist.barrier()
    dist.destroy_process_group()
    return state


def exit_reason(args, state: TrainState, stop: StopSignal, started: float, device: torch.device) -> str | None:
    """Why to stop now, agreed by all ranks: a signal on any rank, the time budget, or --exit-interval."""
    minutes = (time.time() - started) / 60
    out_of_time = bool(args.exit_duration_in_mins) and minutes >= args.exit_duration_in_mins
    signalled, timed_out = any_rank([stop.received is not None, out_of_time], device)
    if signalled:
        return "a stop signal" + (f" ({stop.received})" if stop.received else " on another rank")
    if timed_out:
        return f"--exit-duration-in-mins {args.exit_duration_in_mins}"
    if args.exit_interval and state.iteration % args.exit_interval == 0:
        return f"--exit-interval {args.exit_interval}"
    return None


def train(args, cfg, engine, scheduler, guard, datasets, state: TrainState, writer: MetricsWriter,
          device: torch.device, accum: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = iter(build_loader(datasets["train"], state.consumed_samples, args.micro_batch_size, rank, world,
                                args.num_workers))
    valid = datasets["valid"] if args.eval_iters else None
    if valid is not None and state.iteration == 0:  # a baseline point for the validation curve
        run_validation(engine, valid, args, state, writer, device)
    policy = BadStepPolicy(args.max_skipped_steps, args.loss_spike_factor)
    inject = {int(i) for i in args.inject_nan_loss_at.split(",") if i}
    stop, started = StopSignal(), time.time()
    throughput = Throughput(cfg, args, device)
    interval_loss, interval_applied = torch.zeros((), device=device), 0
    last_global_loss = [float("nan")]

    def spike(local_mean: torch.Tensor) -> bool:
        last_global_loss[0] = all_ranks_mean(local_mean)
        return policy.is_spike(last_global_loss[0])

    last_saved = state.iteration
    while state.iteration < args.train_iters:
        lr = scheduler.get_last_lr()[0]
        loss = train_step(engine, batches, accum, device, spike if args.loss_spike_factor else None,
                          inject_nan=state.iteration + 1 in inject and rank == 0)
        state.iteration += 1
        state.consumed_samples += args.global_batch_size
        throughput.iters += 1
        applied = engine.was_step_applied() and not (guard and guard.skipped)
        policy.record(applied, last_global_loss[0])
        if applied:
            interval_loss += loss
            interval_applied += 1
        else:
            first = state.consumed_samples - args.global_batch_size
            writer.line(f"skipped the update of iteration {state.iteration} (loss {all_ranks_mean(loss):.4E}, "
                        f"grad norm {engine.get_global_grad_norm()}); global samples [{first}, "
                        f"{state.consumed_samples}); {policy.consecutive} in a row, {policy.total} in total")
            if policy.exhausted:
                raise TrainingStopped(
                    f"{policy.consecutive} consecutive updates skipped (--max-skipped-steps {args.max_skipped_steps})"
                    f", the last at iteration {state.iteration}, global samples [{first}, {state.consumed_samples})"
                    f" of the train split; inspect that data, lower --lr, or resume from an earlier checkpoint")
        if state.iteration % args.log_interval == 0:
            mean = all_ranks_mean(interval_loss / max(interval_applied, 1)) if interval_applied else float("nan")
            grad_norm = float(engine.get_global_grad_norm() or 0.0)
            log_train(writer, state, args, mean, lr, grad_norm, policy.total, throughput.measure(), device)
            interval_loss.zero_()
            interval_applied = 0
        if valid is not None and state.iteration % args.eval_interval == 0:
            run_validation(engine, valid, args, state, writer, device)
        if args.save and args.save_interval and state.iteration % args.save_interval == 0:
            save_checkpoint(engine, args.save, state, cfg, args)
            last_saved = state.iteration
        reason = exit_reason(args, state, stop, started, device)
        if reason:
            if args.save and last_saved != state.iteration:
                save_checkpoint(engine, args.save, state, cfg, args)
            saved = f"checkpoint {args.save}/iter_{state.iteration:07d}" if args.save else "nothing saved (no --save)"
            writer.line(f"exiting at iteration {state.iteration} after {reason}; {saved}")
            return
    if valid is not None and state.iteration % args.eval_interval:
        run_validation(engine, valid, args, state, writer, device)
    if args.save and last_saved != state.iteration:
        save_checkpoint(engine, args.save, state, cfg, args)
    writer.line(f"done: {state.iteration} iterations, {state.consumed_samples} samples, "
                f"{policy.total} skipped updates")


def main(argv: list[str] | None = None) -> None:
    # DeepSpeed still calls collectives that torch has renamed; the warnings repeat every step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated")
    try:
        pretrain(parse_args(argv))
    except (ConfigError, DatasetFormatError, CheckpointError, TrainingStopped) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
