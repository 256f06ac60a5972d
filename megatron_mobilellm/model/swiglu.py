"""Fused SwiGLU: ``silu(gate) * up`` on the fused ``linear_fc1`` output, with a recomputing backward.

The autograd graph of the unfused formula keeps ``silu(gate)`` and the product alive for backward; this op keeps
only its input (which ``linear_fc1`` already had to produce) and recomputes the sigmoid, saving two
``[tokens, ffn]`` activations per block. On CUDA a Triton kernel does each direction in one pass; elsewhere the
same maths runs as torch ops.
"""

from __future__ import annotations

import os

import torch

from megatron_mobilellm.model import triton_kernels


def _swiglu_fwd_torch(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(x.dtype)


def _swiglu_bwd_torch(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    gate, up = x.float().chunk(2, dim=-1)
    g = grad_out.float()
    sig = torch.sigmoid(gate)
    silu = gate * sig
    d_gate = g * up * sig * (1.0 + gate * (1.0 - sig))
    d_up = g * silu
    return torch.cat([d_gate, d_up], dim=-1).to(x.dtype)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, use_triton: bool) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.use_triton = use_triton
        return triton_kernels.swiglu_fwd(x) if use_triton else _swiglu_fwd_torch(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dx = triton_kernels.swiglu_bwd(x, grad_out) if ctx.use_triton else _swiglu_bwd_torch(x, grad_out)
        return dx, None


def _want_triton(x: torch.Tensor, backend: str) -> bool:
    if backend == "torch" or torch.compiler.is_compiling():  # inductor fuses the torch maths itself
        return False
    if backend == "triton":
        if not triton_kernels.AVAILABLE:
            raise RuntimeError("swiglu backend 'triton' requested but triton is not importable")
        return True
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return triton_kernels.AVAILABLE and (x.is_cuda or interpret)


def swiglu(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``silu(x[..., :F]) * x[..., F:]`` for ``x`` of width ``2F`` (Megatron's fc1 layout: gate, then up)."""
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dimension, got {x.shape[-1]}")
    return _SwiGLU.apply(x.contiguous(), _want_triton(x, backend))


def swiglu_reference(x: torch.Tensor) -> torch.Tensor:
    """The unfused formula, for tests and the eager path."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
