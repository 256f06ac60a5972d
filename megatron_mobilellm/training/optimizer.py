"""AdamW with the seed's parameter groups: weight decay on matrices, never on norms; the tied embedding
decayed unless ``--no-weight-decay-embedding``."""

from __future__ import annotations

import argparse

import torch


def param_groups(model: torch.nn.Module, weight_decay: float, decay_embedding: bool) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or (name.startswith("embedding.") and not decay_embedding)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace, device: torch.device,
                    offload: bool = False) -> torch.optim.Optimizer:
    """``offload``: the optimizer runs on the CPU (ZeRO-Offload), where DeepSpeed's vectorised CPUAdam is used."""
    groups = param_groups(model, args.weight_decay, not args.no_weight_decay_embedding)
    hyper = dict(lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps)
    if args.optimizer == "deepspeed_adam" or offload:
        if device.type == "cuda" and not offload:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **hyper)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **hyper)
    return torch.optim.AdamW(groups, fused=device.type == "cuda", **hyper)
