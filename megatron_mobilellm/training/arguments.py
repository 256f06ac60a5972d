"""Command-line arguments of ``megatron_mobilellm.pretrain``, with Megatron's names, and their validation.

Everything checkable without touching data, devices or DeepSpeed is checked here, so a bad command fails in
about a second with a message that names the flag.
"""

from __future__ import annotations

import argparse
import math

from megatron_mobilellm.config import PRESETS, ModelConfig, get_config
from megatron_mobilellm.errors import ArgumentParser, ConfigError
from megatron_mobilellm.model.attention import BACKENDS
from megatron_mobilellm.training.config import (OPTIMIZERS, EngineConfig, OptimizerConfig, RunConfig, ScheduleConfig,
                                                TrainingConfig)


def add_engine_arguments(g: argparse._ArgumentGroup) -> None:
    """The flags of ``EngineConfig`` (but the seed), shared with the benchmark so both accept the same choices."""
    g.add_argument("--attention-backend", choices=BACKENDS, default=EngineConfig.attention_backend)
    g.add_argument("--recompute-activations", "--activation-checkpointing", dest="recompute_activations",
                   action="store_true", help="checkpoint every block (recompute its activations in backward)")
    g.add_argument("--compile", nargs="?", const="blocks", default=None, choices=["blocks", "decoder"],
                   help="torch.compile each block (default) or the whole decoder as one graph")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="with --compile on a GPU: replay the compiled forward/backward as CUDA graphs (not ZeRO-3)")
    g.add_argument("--loss-chunk-size", type=int, default=EngineConfig.loss_chunk_size,
                   help="tokens per chunk of the output/loss")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Pretrain a MobileLLM under DeepSpeed.", allow_abbrev=False)
    g = p.add_argument_group("model")
    g.add_argument("--model-size", choices=list(PRESETS), default="125M")
    g.add_argument("--layer-sharing", action="store_true", help="MobileLLM-LS: run each block twice in a row")
    g.add_argument("--vocab-size", type=int, default=None, help="default: the preset's (32000 for real sizes)")
    g.add_argument("--untie-embeddings", action="store_true", help="separate output layer (MobileLLM ties them)")
    add_engine_arguments(g)

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", required=True, help="[W1] PREFIX1 [W2 PREFIX2 ...]")
    g.add_argument("--split", default="969,30,1", help="train,valid,test document proportions")
    g.add_argument("--seq-length", type=int, default=2048)
    g.add_argument("--data-cache-path", default=None, help="where index arrays are cached (default: beside data)")
    g.add_argument("--num-workers", type=int, default=2, help="data-loader worker processes per rank")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, required=True)
    g.add_argument("--global-batch-size", type=int, required=True)
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--seed", type=int, default=EngineConfig.seed)
    g.add_argument("--bf16", action="store_true", help="bf16 compute with fp32 master weights (default on GPU)")
    g.add_argument("--fp32", action="store_true", help="fp32 throughout (default on CPU)")

    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--min-lr", type=float, default=None, help="default: 10%% of --lr (the seed's recipe)")
    g.add_argument("--lr-warmup-iters", type=int, default=1000)
    g.add_argument("--lr-decay-style", choices=["cosine", "linear", "constant", "wsd"], default="cosine")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None,
                   help="WSD: length of the final decay phase (default 20%% of --train-iters)")
    g.add_argument("--weight-decay", type=float, default=OptimizerConfig.weight_decay)
    g.add_argument("--no-weight-decay-embedding", action="store_true",
                   help="exclude the (tied) embedding from weight decay (the seed decays it)")
    g.add_argument("--adam-beta1", type=float, default=OptimizerConfig.adam_beta1)
    g.add_argument("--adam-beta2", type=float, default=OptimizerConfig.adam_beta2)
    g.add_argument("--adam-eps", type=float, default=OptimizerConfig.adam_eps)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=OptimizerConfig.optimizer,
                   help="torch AdamW (fused on GPU) or DeepSpeed's FusedAdam/CPUAdam")

    g = p.add_argument_group("checkpoints, evaluation and logging")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None, help="resume from the newest checkpoint here, if any")
    g.add_argument("--finetune", action="store_true",
                   help="take only the weights from --load; start at iteration 0 with a fresh optimizer")
    g.add_argument("--override-invalid-checkpoints", action="store_true",
                   help="when no checkpoint in --load is complete, start from scratch instead of stopping (the "
                        "invalid tags are set aside, not deleted)")
    g.add_argument("--skip-train", action="store_true",
                   help="evaluate --load on the validation and test splits (--eval-iters batches each) and exit: "
                        "no training step, nothing saved")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop (after saving, with --save) once the iteration is a multiple of this")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit once the run has lasted this long (e.g. before a job's time limit)")
    g.add_argument("--keep-last", type=int, default=None, help="keep only the newest N complete checkpoints")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for MFU (default: from the GPU name; dense bf16)")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    g = p.add_argument_group("bad steps")
    g.add_argument("--max-skipped-steps", type=int, default=10,
                   help="stop after this many consecutive skipped updates (non-finite loss/gradients, spikes)")
    g.add_argument("--loss-spike-factor", type=float, default=None,
                   help="also skip an update whose loss exceeds this factor × the running mean of recent losses")
    g.add_argument("--inject-nan-loss-at", default="", help=argparse.SUPPRESS)  # fault injection for tests

    import deepspeed

    deepspeed.add_config_arguments(p)  # --deepspeed, --deepspeed_config
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    validate_args(args)
    return args


def model_config(args: argparse.Namespace) -> ModelConfig:
    return get_config(args.model_size, vocab_size=args.vocab_size, layer_sharing=args.layer_sharing,
                      tie_embeddings=not args.untie_embeddings)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(attention_backend=args.attention_backend, loss_chunk_size=args.loss_chunk_size,
                        recompute_activations=args.recompute_activations, compile=args.compile,
                        cuda_graphs=args.cuda_graphs, seed=args.seed)


def run_config(args: argparse.Namespace) -> RunConfig:
    """The typed configs of a validated command line, built once for the whole run."""
    optimizer = OptimizerConfig(optimizer=args.optimizer, weight_decay=args.weight_decay,
                                decay_embedding=not args.no_weight_decay_embedding, adam_beta1=args.adam_beta1,
                                adam_beta2=args.adam_beta2, adam_eps=args.adam_eps)
    schedule = ScheduleConfig(lr=args.lr, min_lr=args.min_lr, warmup_iters=args.lr_warmup_iters,
                              decay_iters=args.lr_decay_iters or args.train_iters, style=args.lr_decay_style,
                              wsd_decay_iters=args.lr_wsd_decay_iters or max(1, args.train_iters // 5))
    training = TrainingConfig(
        train_iters=args.train_iters, micro_batch_size=args.micro_batch_size,
        global_batch_size=args.global_batch_size, seq_length=args.seq_length, num_workers=args.num_workers,
        log_interval=args.log_interval, eval_interval=args.eval_interval, eval_iters=args.eval_iters,
        save=args.save, save_interval=args.save_interval, keep_last=args.keep_last, exit_interval=args.exit_interval,
        exit_duration_in_mins=args.exit_duration_in_mins, max_skipped_steps=args.max_skipped_steps,
        loss_spike_factor=args.loss_spike_factor,
        inject_nan_loss_at=frozenset(int(i) for i in args.inject_nan_loss_at.split(",") if i),
        peak_tflops=args.peak_tflops)
    return RunConfig(model=model_config(args), engine=engine_config(args), optimizer=optimizer, schedule=schedule,
                     training=training, cli_args=vars(args))


# flag: (lowest, highest, lowest allowed, highest allowed); None values (flag not given) are not checked.
RANGES = {
    "lr": (0.0, math.inf, False, False), "min_lr": (0.0, math.inf, True, False),
    "clip_grad": (0.0, math.inf, True, False), "weight_decay": (0.0, math.inf, True, False),
    "adam_beta1": (0.0, 1.0, True, False), "adam_beta2": (0.0, 1.0, True, False),
    "adam_eps": (0.0, math.inf, False, False), "loss_spike_factor": (1.0, math.inf, False, False),
    "exit_duration_in_mins": (0.0, math.inf, False, False), "peak_tflops": (0.0, math.inf, False, False),
    "lr_warmup_iters": (0, math.inf, True, False), "lr_decay_iters": (0, math.inf, False, False),
    "lr_wsd_decay_iters": (0, math.inf, False, False), "num_workers": (0, math.inf, True, False),
    "seed": (0, 2**32, True, False), "vocab_size": (0, math.inf, False, False),
    "exit_interval": (0, math.inf, False, False), "eval_iters": (0, math.inf, True, False),
    "save_interval": (0, math.inf, False, False), "keep_last": (1, math.inf, True, False),
    "max_skipped_steps": (1, math.inf, True, False),
}


def check_ranges(args: argparse.Namespace) -> None:
    """Every numeric flag finite and in its range before any work (argparse's ``float`` takes ``nan`` and
    ``inf``, which would otherwise train on silently or fail hours later)."""
    for flag, (low, high, low_ok, high_ok) in RANGES.items():
        value = getattr(args, flag)
        if value is None:
            continue
        inside = (low <= value if low_ok else low < value) and (value <= high if high_ok else value < high)
        if not math.isfinite(value) or not inside:
            interval = f"{'[' if low_ok else '('}{low}, {'∞' if high == math.inf else high}{']' if high_ok else ')'}"
            raise ConfigError(f"--{flag.replace('_', '-')} {value} must be finite and lie in {interval}")


def validate_args(args: argparse.Namespace) -> None:
    def check(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    for flag in ("micro_batch_size", "global_batch_size", "train_iters", "seq_length", "log_interval",
                 "eval_interval", "loss_chunk_size"):
        check(getattr(args, flag) > 0, f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    check(args.global_batch_size % args.micro_batch_size == 0,
          f"--global-batch-size {args.global_batch_size} is not a multiple of --micro-batch-size "
          f"{args.micro_batch_size}")
    check(not (args.bf16 and args.fp32), "--bf16 and --fp32 are exclusive")
    check_ranges(args)
    if args.min_lr is None:
        args.min_lr = 0.1 * args.lr
    check(0 <= args.min_lr <= args.lr, f"--min-lr {args.min_lr} must lie in [0, --lr {args.lr}]")
    check(args.save_interval is None or args.save is not None, "--save-interval needs --save DIR")
    check(not args.finetune or args.load is not None, "--finetune needs --load DIR")
    check(not args.skip_train or args.load is not None, "--skip-train needs a checkpoint to evaluate (--load)")
    check(not args.skip_train or args.eval_iters > 0,
          "--skip-train evaluates --eval-iters batches per split, so it must be positive (--eval-iters)")
    check(not args.cuda_graphs or args.compile is not None, "--cuda-graphs needs --compile (blocks or decoder)")
    check(args.deepspeed_config is not None, "--deepspeed_config is required (see ds_configs/)")
    try:
        cfg = model_config(args)
    except ValueError as e:
        raise ConfigError(f"--model-size {args.model_size}: {e}") from None
    check(args.seq_length <= cfg.max_position_embeddings,
          f"--seq-length {args.seq_length} exceeds the model's max positions ({cfg.max_position_embeddings})")


def data_parallel_checks(args: argparse.Namespace, world_size: int) -> int:
    """Gradient-accumulation steps for ``world_size`` data-parallel ranks (errors if the batch does not divide)."""
    per_step = args.micro_batch_size * world_size
    if args.global_batch_size % per_step:
        raise ConfigError(f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
                          f"{args.micro_batch_size} × {world_size} data-parallel ranks = {per_step}")
    return args.global_batch_size // per_step
