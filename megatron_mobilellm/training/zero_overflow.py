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
  clipping decision), reduced over the data-parallel and model-parallel groups and marked -1 when non-finite, as
  DeepSpeed does, but from a Python number (its helper fills from a new device tensor: two host syncs).

The overflow verdict itself made the host wait: DeepSpeed reads the flag back (``.item()``) and checks the norm
with ``bool()`` in ``step`` and per parameter group in the clipping, all before the optimizer update, so the GPU
sat idle while Python issued the rest of the step (8 syncs per step with the norm's; 0 now, +4.3 % at 125M).
``defer_overflow_sync`` lets the update go out with the verdict as a device tensor (the fused AdamW kernel's
``found_inf``, which leaves weights, moments and step count untouched when set) and waits once, at the end of the
step, for a host copy queued right behind the norm; a skipped step's bookkeeping (no LR step, the skip count,
``was_step_applied``) is then done exactly as DeepSpeed does.

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
    from deepspeed.runtime.utils import is_model_parallel_parameter

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
        # DeepSpeed's -1 mark for a non-finite norm, filled from a Python number: its own helper fills from a new
        # device tensor, which costs two host syncs (the copy in, and masked_fill_ reading the value back).
        return total.sqrt().masked_fill_(total.isfinite().logical_not(), -1.0)

    optimizer.get_grad_norm_direct = get_grad_norm_direct


def defer_overflow_sync(optimizer) -> None:
    """Make ``optimizer``'s (ZeRO-1/2, bf16, clipping, fused torch AdamW on the device) overflow check a device
    tensor fed to the AdamW kernel, read back once at the end of ``step``; anything else keeps DeepSpeed's step."""
    base = getattr(optimizer, "optimizer", None)
    if not (isinstance(base, torch.optim.Adam | torch.optim.AdamW) and base.defaults.get("fused")
            and _patchable(optimizer, "unscale_and_clip_grads", "overflow check before the optimizer step")):
        return
    if not (optimizer.check_grad_overflow and optimizer.compute_grad_norm and optimizer.clip_grad > 0
            and optimizer.dtype == torch.bfloat16 and not optimizer.dynamic_loss_scale and not optimizer.cpu_offload
            and optimizer.torch_autocast_gradscaler is None and not optimizer.zenflow):
        return
    stock_step = optimizer.step
    cuda = torch.device(optimizer.device).type == "cuda"
    verdict = torch.zeros((), pin_memory=cuda)  # the host's copy of the step's overflow flag
    copied = torch.cuda.Event() if cuda else None

    def unscale_and_clip_grads(grad_groups_flat, total_norm: torch.Tensor) -> None:
        # DeepSpeed's verdict (a non-finite norm, or its -1 mark), kept on the device for the AdamW kernel, and
        # copied to the host behind the norm, so the end of the step waits for the norm, not for the update.
        invalid = torch.logical_or(torch.isfinite(total_norm).logical_not(), total_norm < 0)
        base.found_inf = invalid.float()
        verdict.copy_(base.found_inf, non_blocking=cuda)
        if copied is not None:
            copied.record()
        norm = torch.where(invalid, torch.full_like(total_norm, float("inf")), total_norm)
        clip = torch.clamp(((norm / optimizer.loss_scale) + 1e-6) / optimizer.clip_grad, min=1.0)
        combined_scale = clip * optimizer.loss_scale
        for grad in grad_groups_flat:
            grad.data.mul_(1. / combined_scale)

    def step(closure=None) -> None:
        stock_step(closure)  # with check_grad_overflow off it never stops before the update
        if base.__dict__.pop("found_inf", None) is None:
            return
        if copied is not None:
            copied.synchronize()  # the step's one wait, with all its work queued; the GPU runs on with the update
        if verdict.item():
            optimizer.overflow = True
            optimizer._update_scale(True)
            optimizer._global_grad_norm = float("inf")
            optimizer.zero_grad(set_to_none=True)

    optimizer.check_grad_overflow = False
    optimizer.unscale_and_clip_grads = unscale_and_clip_grads
    optimizer.step = step


PATCHED = ("has_overflow_partitioned_grads_serial", "get_grad_norm_direct", "unscale_and_clip_grads", "step")


def restore_stock(optimizer) -> None:
    """Undo every patch above (ablations): DeepSpeed's own methods, and its overflow check before the update."""
    if "step" in vars(optimizer):
        optimizer.check_grad_overflow = True
    for name in PATCHED:
        optimizer.__dict__.pop(name, None)
