"""AdamW with the seed's parameter groups: weight decay on matrices, never on norms; the tied embedding
decayed unless ``--no-weight-decay-embedding``."""

from __future__ import annotations

import torch

from megatron_mobilellm.training.config import OptimizerConfig


def param_groups(model: torch.nn.Module, weight_decay: float, decay_embedding: bool) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or (name.startswith("embedding.") and not decay_embedding)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, lr: float, device: torch.device,
                    offload: bool = False) -> torch.optim.Optimizer:
    """``lr``: the starting value (the schedule sets it before every step). ``offload``: the optimizer runs on the
    CPU (ZeRO-Offload), where DeepSpeed's vectorised CPUAdam is used."""
    groups = param_groups(model, cfg.weight_decay, cfg.decay_embedding)
    hyper = dict(lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    if cfg.optimizer == "deepspeed_adam" or offload:
        if device.type == "cuda" and not offload:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **hyper)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **hyper)
    return torch.optim.AdamW(groups, fused=device.type == "cuda", **hyper)
