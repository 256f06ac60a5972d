"""One fused inf/NaN check of the gradients for DeepSpeed's ZeRO-1/2 optimizer in bf16.

DeepSpeed asks "is any gradient element non-finite?" once per gradient tensor, with about seven small kernels each
(amax, amin, isfinite twice, and, not, add): about 1,300 launches per step for a 125M MobileLLM, which kept the GPU
waiting for about a fifth of every step on an H200 (255K tokens/s with the check, 322K without). One foreach norm
over all gradients answers the same question with a handful of launches: a sum of squares is finite exactly when
every element is (a sum overflowing fp32 — gradients near 1e19 — also counts as overflow, as it should).
The check still runs every step and still skips the update exactly as DeepSpeed's own does.

The patch replaces a DeepSpeed internal, so it is applied only to the DeepSpeed versions it was tested with (the
range setup.py pins); any other version keeps DeepSpeed's own check, with a warning.
"""

from __future__ import annotations

import warnings

import torch
from packaging.specifiers import SpecifierSet

TESTED_DEEPSPEED = SpecifierSet(">=0.19.8,<0.20")  # setup.py pins the same range (tested)


def fuse_overflow_check(optimizer) -> None:
    """Replace ``optimizer``'s per-tensor overflow check by a fused one where it applies; other ZeRO stages, fp32,
    a DeepSpeed without this method or an untested DeepSpeed version keep DeepSpeed's own check."""
    import deepspeed
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not (isinstance(optimizer, DeepSpeedZeroOptimizer) and getattr(optimizer, "check_grad_overflow", False)
            and hasattr(optimizer, "has_overflow_partitioned_grads_serial")):
        return
    if deepspeed.__version__ not in TESTED_DEEPSPEED:
        warnings.warn(f"DeepSpeed {deepspeed.__version__} is outside the tested range {TESTED_DEEPSPEED}: keeping "
                      "DeepSpeed's own gradient overflow check instead of the fused one (same result, slower on GPU)",
                      RuntimeWarning, stacklevel=2)
        return

    def has_overflow_partitioned_grads_serial() -> torch.Tensor:
        grads = [g for i in range(len(optimizer.bit16_groups)) for g in optimizer.averaged_gradients[i]
                 if g is not None]
        total = torch.nn.utils.get_total_norm(grads).to(optimizer.device)  # 0 for no gradients
        return torch.isfinite(total).logical_not().reshape(1)  # DeepSpeed's shape: a 1-element bool tensor

    optimizer.has_overflow_partitioned_grads_serial = has_overflow_partitioned_grads_serial
