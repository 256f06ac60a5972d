"""Pretrain a MobileLLM under DeepSpeed ZeRO.

    deepspeed [--hostfile hosts] --module megatron_mobilellm.pretrain --model-size 125M --data-path PREFIX \\
        --micro-batch-size 32 --global-batch-size 256 --train-iters 480000 --lr 5e-4 \\
        --deepspeed_config ds_configs/zero2.json --save ckpt --load ckpt --tensorboard-dir tb

Also runs under ``torchrun`` and as plain ``python -m megatron_mobilellm.pretrain`` (one process). Relaunching the
same command (``--load`` = ``--save``) continues from the newest complete checkpoint; SIGTERM/SIGUSR1 save and
exit 0.

The entry point only: parse → check → build → train → finish. The parts live in ``training/`` and are imported
from there (never from this script).
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
import torch.distributed as dist

from megatron_mobilellm.data.builder import build_datasets, check_data_args
from megatron_mobilellm.errors import CheckpointError, ConfigError, DatasetFormatError, cli_main
from megatron_mobilellm.training.arguments import data_parallel_checks, parse_args, run_config
from megatron_mobilellm.training.checkpointing import (TrainState, check_resume, check_save_dir, decide_resume,
                                                       initial_weights, load_checkpoint, prepare_universal)
from megatron_mobilellm.training.distributed import exit_without_teardown, init_distributed, rank0_print
from megatron_mobilellm.training.ds_config import build_ds_config
from megatron_mobilellm.training.engine import build_engine, check_cuda_graphs
from megatron_mobilellm.training.loop import Trainer
from megatron_mobilellm.training.metrics import MetricsWriter


def requested_samples(args: argparse.Namespace) -> dict[str, int]:
    """Megatron-LM's requests, so the valid set is Megatron-LM's (it walks on by --eval-iters batches per
    validation; each validation here uses the first --eval-iters batches, the ones of Megatron-LM's first)."""
    validations = args.train_iters // args.eval_interval + 1
    samples = {"train": args.train_iters * args.global_batch_size,
               "valid": validations * args.eval_iters * args.global_batch_size}
    if args.skip_train:  # no train set; Megatron-LM's test request, --eval-iters batches
        samples.update(train=0, test=args.eval_iters * args.global_batch_size)
    return samples


def check_data(args: argparse.Namespace) -> None:
    """Fail on a bad --data-path/--split before starting any process group or building a model."""
    try:
        for warning in check_data_args(args.data_path, args.split, args.seq_length, requested_samples(args)):
            rank0_print(f"warning: {warning}")
    except DatasetFormatError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def pretrain(args: argparse.Namespace) -> TrainState:
    # Check everything that can fail cheaply, before any process group or model exists.
    check_data(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # known before the process group: check the batch first
    accum = data_parallel_checks(args, world)
    bf16 = args.bf16 or (not args.fp32 and torch.cuda.is_available())
    ds_config = build_ds_config(args.deepspeed_config, args.micro_batch_size, accum, world, args.clip_grad, bf16)
    check_cuda_graphs(args.cuda_graphs, ds_config, args.deepspeed_config)
    run = run_config(args)
    save = None if args.skip_train else args.save  # --skip-train writes (and sets aside) nothing
    if save:
        check_save_dir(save)

    # Build: process group, the resume decision, data, engine, and the state to continue from.
    device = init_distributed()
    plan = decide_resume(args.load, save, args.finetune, args.override_invalid_checkpoints, rank0_print)
    if plan:
        check_resume(args.load, plan, run.model, ds_config.get("zero_optimization", {}).get("stage", 0))
    if plan and plan.universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    datasets = build_datasets(args.data_path, args.split, args.seq_length, args.seed, requested_samples(args),
                              args.data_cache_path, run.model.vocab_size)
    if datasets["valid"] is not None and len(datasets["valid"]) < args.eval_iters * args.global_batch_size:
        raise ConfigError(f"--eval-iters {args.eval_iters} needs {args.eval_iters * args.global_batch_size} "
                          f"validation samples; the valid split has {len(datasets['valid'])} (--data-path, --split)")
    weights = initial_weights(args.load, run.model, args.finetune) if args.load and not plan else None
    engine, scheduler, guard = build_engine(run.model, run.engine, run.optimizer, run.schedule, device, ds_config,
                                            weights)
    writer = MetricsWriter(dist.get_rank(), args.tensorboard_dir)
    state = TrainState()
    if plan:
        if plan.universal:
            writer.line(f"{plan.tag} was saved by {plan.manifest['world_size']} ranks; loading it through "
                        f"DeepSpeed's universal checkpoint format for {world}")
            prepare_universal(args.load, plan)
        state = load_checkpoint(engine, args.load, run.model, plan)
        writer.line(f"resumed from {args.load}/{plan.tag} at iteration {state.iteration}")
    elif weights is not None:
        writer.line(f"initialised weights from {args.load}; starting at iteration 0")
    elif args.skip_train:
        raise CheckpointError(f"no complete checkpoint to evaluate in {args.load} (--skip-train)")
    elif args.load:
        writer.line(f"no complete checkpoint in {args.load}; starting from scratch")
    writer.line(f"world size {world} | micro batch {args.micro_batch_size} | gradient accumulation {accum} | "
                f"global batch {args.global_batch_size} | precision {'bf16' if bf16 else 'fp32'} | "
                f"ZeRO stage {engine.zero_optimization_stage()} | device {device}")

    # Train (or only evaluate), then finish in order.
    trainer = Trainer(run, engine, scheduler, guard, datasets, writer, device, state)
    try:
        trainer.evaluate_only() if args.skip_train else trainer.train()
    finally:
        writer.close()
    # An orderly teardown: leaving gloo/NCCL threads to the interpreter's exit can abort a rank after success.
    dist.barrier()
    dist.destroy_process_group()
    return state


@cli_main
def main(argv: list[str] | None = None) -> None:
    # DeepSpeed still calls collectives that torch has renamed; the warnings repeat every step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated")
    pretrain(parse_args(argv))


if __name__ == "__main__":
    main()
    exit_without_teardown()
