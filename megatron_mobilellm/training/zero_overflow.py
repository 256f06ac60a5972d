"""Fused gradient reductions for DeepSpeed's ZeRO-1/2 optimizer: the bf16 overflow check and the gradient norm.

Both of DeepSpeed's versions walk the gradients one tensor at a time. The overflow check asks "is any element
non-finite?" with about seven small kernels per tensor (amax, amin, isfinite twice, and, not, add): about 1,300
launches per step for a 125M MobileLLM, which kept the GPU waiting for about a fifth of every step on an H200 (255K
tokens/s with the check, 322K without). The gradient norm (for clipping) casts each gradient to fp64 and takes its
norm, another few hundred launches and a full fp64 copy of every gradient. One foreach norm over all gradients
answers each with a handful of launches (both together: +14 % at 125M micro-batch 32, docs/performance.md):

- overflow: a sum of squares is finite exactly when every element is (a sum overflowing fp32 — gradients near
  1e19 — also counts as overflow, as it should); the check still runs every step and skips the update exactly as
  DeepSpeed's own does;
- norm: per-tensor norms accumulated in fp32 instead of fp64 (relative difference ~1e-7, far below what moves a
  clipping decision), reduced over the data-parallel and model-parallel groups and masked to -1 when non-finite,
  as DeepSpeed does.

The patches replace DeepSpeed internals, so they are applied only to the DeepSpeed versions they were tested with
(the range setup.py pins); any other version keeps DeepSpeed's own methods, with a warning.
"""

from __future__ import annotations

import warnings

import torch
from packaging.specifiers import SpecifierSet

TESTED_DEEPSPEED = SpecifierSet(">=0.19.8,<0.20")  # setup.py pins the same range (tested)


def _patchable(optimizer, method: str, what: str) -> bool:
    """Whether ``optimizer`` is a ZeRO-1/2 optimizer with ``method`` from a DeepSpeed version the patch was tested
    with; an untested version says so and keeps DeepSpeed's own ``what``."""
    import deepspeed
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not (isinstance(optimizer, DeepSpeedZeroOptimizer) and hasattr(optimizer, method)):
        return False
    if deepspeed.__version__ not in TESTED_DEEPSPEED:
        warnings.warn(f"DeepSpeed {deepspeed.__version__} is outside the tested range {TESTED_DEEPSPEED}: keeping "
                      f"DeepSpeed's own {what} instead of the fused one (same result, slower on GPU)",
                      RuntimeWarning, stacklevel=3)
        return False
    return True


def fuse_overflow_check(optimizer) -> None:
    """Replace ``optimizer``'s per-tensor overflow check by a fused one where it applies; other ZeRO stages, fp32,
    a DeepSpeed without this method or an untested DeepSpeed version keep DeepSpeed's own check."""
    if not (getattr(optimizer, "check_grad_overflow", False)
            and _patchable(optimizer, "has_overflow_partitioned_grads_serial", "gradient overflow check")):
        return

    def has_overflow_partitioned_grads_serial() -> torch.Tensor:
        grads = [g for i in range(len(optimizer.bit16_groups)) for g in optimizer.averaged_gradients[i]
                 if g is not None]
        total = torch.nn.utils.get_total_norm(grads).to(optimizer.device)  # 0 for no gradients
        return torch.isfinite(total).logical_not().reshape(1)  # DeepSpeed's shape: a 1-element bool tensor

    optimizer.has_overflow_partitioned_grads_serial = has_overflow_partitioned_grads_serial


def fuse_grad_norm(optimizer) -> None:
    """Replace the ZeRO-1/2 optimizer's per-tensor fp64 L2 gradient norm by one foreach norm; other norms, other
    stages, a DeepSpeed without this method or an untested DeepSpeed version keep DeepSpeed's own."""
    if not _patchable(optimizer, "get_grad_norm_direct", "gradient norm"):
        return
    from deepspeed import comm
    from deepspeed.runtime.utils import is_model_parallel_parameter, mask_nan_or_inf_with_val_inplace

    stock = optimizer.get_grad_norm_direct

    def get_grad_norm_direct(gradients, params, norm_type=2) -> torch.Tensor:
        if float(norm_type) != 2.0:
            return stock(gradients, params, norm_type)
        # DeepSpeed's selection: no alignment padding, pipeline-replicated parameters once, model-parallel
        # replicas of a parameter only from model-parallel rank 0.
        unpadded = (g for g in gradients if not getattr(g, "_zero_padding", False))
        grads = [g for g, p in zip(unpadded, params) if not getattr(p, "ds_pipe_replicated", False)
                 and (is_model_parallel_parameter(p) or optimizer.model_parallel_rank == 0)]
        if grads:
            norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
            total = torch.stack(norms).square().sum().to(optimizer.device)
        else:
            total = torch.zeros((), dtype=torch.float32, device=optimizer.device)
        comm.all_reduce(total, op=comm.ReduceOp.SUM, group=optimizer.dp_process_group)
        optimizer._model_parallel_all_reduce(tensor=total, op=comm.ReduceOp.SUM)
        total = total.sqrt()
        mask_nan_or_inf_with_val_inplace(total, device=optimizer.device)
        return total

    optimizer.get_grad_norm_direct = get_grad_norm_direct
