"""Typed configs of the trainer's parts (engine, optimizer, LR schedule, loop), built once from the command line.

``training/arguments.py`` fills them from the parsed flags (and checks them there, naming the flag); library code
takes these objects, never an argparse namespace, so the benchmark and tests build them directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_mobilellm.config import ModelConfig

OPTIMIZERS = ("torch_adamw", "deepspeed_adam")


@dataclass
class EngineConfig:
    """How the model is built and run inside the DeepSpeed engine."""

    attention_backend: str = "auto"
    """Attention kernel (``model.attention.BACKENDS``)."""
    loss_chunk_size: int = 4096
    """Tokens per chunk of the fused output projection + cross entropy."""
    recompute_activations: bool = False
    """Recompute every block in backward instead of keeping its activations."""
    compile: str | None = None
    """``blocks`` or ``decoder``: what torch.compile wraps; None for eager."""
    cuda_graphs: bool = False
    """Replay the compiled forward/backward as CUDA graphs."""
    seed: int = 1234
    """Seed of the weight initialisation."""


@dataclass
class OptimizerConfig:
    """AdamW's hyper-parameters and which implementation runs it (the learning rate is the schedule's)."""

    optimizer: str = "torch_adamw"
    """One of ``OPTIMIZERS``: torch AdamW (fused on GPU) or DeepSpeed's FusedAdam/CPUAdam."""
    weight_decay: float = 0.1
    decay_embedding: bool = True
    """Apply weight decay to the (tied) embedding, as the seed recipe does."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8


@dataclass
class ScheduleConfig:
    """The learning-rate schedule: linear warmup from 0, then ``style`` down to ``min_lr``."""

    lr: float
    min_lr: float
    warmup_iters: int
    decay_iters: int
    """Iteration at which the decay reaches ``min_lr``."""
    style: str
    """``cosine``, ``linear``, ``constant`` or ``wsd`` (warmup-stable-decay)."""
    wsd_decay_iters: int
    """WSD: length of the final decay phase."""


@dataclass
class TrainingConfig:
    """What the training loop needs: batch geometry, intervals, where to save, and when to stop."""

    train_iters: int
    micro_batch_size: int
    global_batch_size: int
    seq_length: int
    num_workers: int
    """Data-loader worker processes per rank."""
    log_interval: int
    eval_interval: int
    eval_iters: int
    """Global batches of the validation split per evaluation (0: no validation)."""
    save: str | None
    save_interval: int | None
    keep_last: int | None
    """Keep only the newest N complete checkpoints."""
    exit_interval: int | None
    exit_duration_in_mins: float | None
    max_skipped_steps: int
    """Stop after this many consecutive skipped updates."""
    loss_spike_factor: float | None
    """Skip an update whose loss exceeds this factor times the running mean (None: no spike check)."""
    inject_nan_loss_at: frozenset[int]
    """Fault injection for tests: iterations whose first micro-batch loss rank 0 turns into NaN."""
    peak_tflops: float | None
    """Device peak for MFU (None: from the GPU name)."""


@dataclass
class RunConfig:
    """Everything a training run is configured with, as the entry point hands it to the parts."""

    model: ModelConfig
    engine: EngineConfig
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    training: TrainingConfig
    cli_args: dict
    """The parsed command line as given, recorded in every checkpoint."""
