"""FlashAttention-4 (the CuTe-DSL kernels of ``flash-attn-4``) as an optional attention kernel.

The package's own entry point is an ``autograd.Function`` full of Python that ``torch.compile`` cannot trace and
CUDA graphs cannot see into; here its forward and backward are two ``torch.library`` custom ops with fake
(shape-only) implementations, so a compiled decoder keeps one graph with each kernel as an opaque node and the
recorded CUDA graph replays them like any other kernel. Detected at import, never required: without the package
``AVAILABLE`` is False and asking for the backend is refused (``attention.resolve_backend``).

Layout is FlashAttention's: q (b, s, heads, d), k/v (b, s, groups, d), causal, softmax scale 1/sqrt(d); grouped
query heads are handled by the kernel. The log-sum-exp the forward returns (b, heads, s, fp32) is kept for the
backward, as every FlashAttention does, instead of the attention matrix.
"""

from __future__ import annotations

import torch

try:  # optional accelerator: pip install flash-attn-4 (needs nvidia-cutlass-dsl and an SM90/SM100 GPU)
    from flash_attn.cute import interface as _interface

    AVAILABLE = True
except Exception:  # ImportError, or the CuTe DSL failing to load its native libraries
    _interface = None
    AVAILABLE = False


def _kernel_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _interface._flash_attn_fwd(q, k, v, causal=True, return_lse=True)


def _kernel_bwd(q, k, v, out, dout, lse) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _interface._flash_attn_bwd(q, k, v, out, dout, lse, causal=True)


def _contiguous(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The strides the fakes promise (no-ops on FlashAttention's own outputs and on the model's inputs)."""
    return [t.contiguous() for t in tensors]


# The kernels the ops call; tests on machines without the package put a reference implementation here.
kernels = {"fwd": _kernel_fwd, "bwd": _kernel_bwd}


@torch.library.custom_op("mobilellm::fa4_fwd", mutates_args=())
def fa4_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = kernels["fwd"](*_contiguous(q, k, v))
    return out.contiguous(), lse.contiguous()


@fa4_fwd.register_fake
def _(q, k, v):
    b, s, h, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((b, h, s), dtype=torch.float32)


@torch.library.custom_op("mobilellm::fa4_bwd", mutates_args=())
def fa4_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
            lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_contiguous(*kernels["bwd"](*_contiguous(q, k, v, out, dout, lse))))


@fa4_bwd.register_fake
def _(q, k, v, out, dout, lse):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs, *output)


def _backward(ctx, dout: torch.Tensor, _dlse: torch.Tensor | None):
    q, k, v, out, lse = ctx.saved_tensors
    return fa4_bwd(q, k, v, out, dout, lse)


fa4_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention_4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention: q (b, s, heads, d), k/v (b, s, groups, d) → (b, s, heads, d)."""
    return fa4_fwd(q, k, v)[0]
