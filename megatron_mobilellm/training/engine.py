"""Building the DeepSpeed engine: the model (initialised, optionally compiled and recomputing), its optimizer and
LR schedule, and the checks of combinations the engine cannot run, made before any work starts."""

from __future__ import annotations

import torch

from megatron_mobilellm.config import ModelConfig
from megatron_mobilellm.errors import ConfigError
from megatron_mobilellm.model import MobileLLM
from megatron_mobilellm.training.config import EngineConfig, OptimizerConfig, ScheduleConfig
from megatron_mobilellm.training.guard import NonFiniteGradGuard
from megatron_mobilellm.training.lr_scheduler import LRScheduler
from megatron_mobilellm.training.optimizer import build_optimizer
from megatron_mobilellm.training.zero_overflow import defer_overflow_sync, fuse_grad_norm, fuse_overflow_check


def check_cuda_graphs(cuda_graphs: bool, ds_config: dict, ds_config_path: str) -> None:
    """Refuse the combinations CUDA graphs cannot run (or ran wrongly) with, before any work starts."""
    if not cuda_graphs:
        return
    if not torch.cuda.is_available():
        raise ConfigError("--cuda-graphs needs a CUDA device")
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        raise ConfigError(f"--cuda-graphs does not work with ZeRO-3 (--deepspeed_config {ds_config_path}): "
                          "ZeRO-3 gathers parameters into new memory every step, which a recorded graph cannot follow")
    if ds_config["gradient_accumulation_steps"] > 1:
        # Measured on an H200: the second micro-batch's replay overwrites the first one's gradients, which
        # autograd kept as .grad (pytorch/pytorch#169545).
        raise ConfigError(f"--cuda-graphs needs one micro-batch per step, but --global-batch-size "
                          f"{ds_config['train_batch_size']} means {ds_config['gradient_accumulation_steps']} "
                          "micro-batches of gradient accumulation per rank; drop --cuda-graphs or raise "
                          "--micro-batch-size")


def build_engine(model_cfg: ModelConfig, cfg: EngineConfig, optimizer_cfg: OptimizerConfig, schedule: ScheduleConfig,
                 device: torch.device, ds_config: dict, weights: dict[str, torch.Tensor] | None = None):
    """The DeepSpeed engine around a freshly initialised model (or one holding ``weights``), the LR scheduler,
    and the fp32 ZeRO-0 gradient guard where DeepSpeed has none."""
    import deepspeed

    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = MobileLLM(model_cfg, attention_backend=cfg.attention_backend, loss_chunk_size=cfg.loss_chunk_size)
    model.init_weights(torch.Generator(device).manual_seed(cfg.seed))
    if weights is not None:
        model.load_state_dict(weights)
    model.set_activation_checkpointing(cfg.recompute_activations)
    if cfg.compile:
        model.compile(cfg.compile, cuda_graphs=cfg.cuda_graphs)
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
    optimizer = build_optimizer(model, optimizer_cfg, schedule.lr, device, offload)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                                   lr_scheduler=lambda opt: LRScheduler(opt, schedule))
    fuse_overflow_check(engine.optimizer)
    fuse_grad_norm(engine.optimizer)
    defer_overflow_sync(engine.optimizer)
    plain_fp32 = engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()
    guard = NonFiniteGradGuard(optimizer, scheduler) if plain_fp32 else None
    return engine, scheduler, guard
