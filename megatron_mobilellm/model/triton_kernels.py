"""Triton kernels (optional). ``AVAILABLE`` is False where triton does not import; callers then use torch.

Runs on CUDA, and on CPU under ``TRITON_INTERPRET=1`` so CI can test the kernels' arithmetic.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the environment
    AVAILABLE = False

_BLOCK = 1024

if AVAILABLE:

    @triton.jit
    def _swiglu_fwd_kernel(x_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        gate = tl.load(x_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
        tl.store(out_ptr + row * n_cols + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(x_ptr, g_ptr, dx_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        gate = tl.load(x_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        d_gate = g * up * sig * (1.0 + gate * (1.0 - sig))
        d_up = g * gate * sig
        tl.store(dx_ptr + row * 2 * n_cols + cols, d_gate.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_ptr + row * 2 * n_cols + n_cols + cols, d_up.to(dx_ptr.dtype.element_ty), mask=mask)


def _grid(rows: int, n_cols: int) -> tuple[int, int]:
    return rows, triton.cdiv(n_cols, _BLOCK)


def swiglu_fwd(x: torch.Tensor) -> torch.Tensor:
    n_cols = x.shape[-1] // 2
    rows = x.numel() // x.shape[-1]
    out = torch.empty(*x.shape[:-1], n_cols, dtype=x.dtype, device=x.device)
    _swiglu_fwd_kernel[_grid(rows, n_cols)](x, out, n_cols, BLOCK=_BLOCK)
    return out


def swiglu_bwd(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    n_cols = x.shape[-1] // 2
    rows = x.numel() // x.shape[-1]
    dx = torch.empty_like(x)
    _swiglu_bwd_kernel[_grid(rows, n_cols)](x, grad_out, dx, n_cols, BLOCK=_BLOCK)
    return dx
