"""Next-token cross-entropy through the (tied) output matrix without a full fp32 ``[tokens, vocab]`` logits tensor.

At 125M with micro-batch 16 × 2048 tokens the fp32 logits alone are 4 GiB, more than the whole model state.
``linear_cross_entropy`` walks the tokens in chunks; for each it forms the chunk's logits, its loss, and — when a
gradient is needed — the gradient of the hidden states and of the weight right away (the approach of
Liger-kernel's fused linear cross-entropy), so at most one chunk of logits is ever alive and backward only scales
the stored gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_mobilellm.model import triton_kernels

IGNORE_INDEX = -100


def _chunk_loss_and_grad_eager(logits: torch.Tensor, y: torch.Tensor, n_valid: torch.Tensor, acc_dtype: torch.dtype,
                               compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed loss of one chunk and d(mean loss)/d(logits) in the logits' dtype (softmax − one-hot, / n_valid)."""
    logits32 = logits.to(acc_dtype)
    loss = F.cross_entropy(logits32, y, ignore_index=IGNORE_INDEX, reduction="sum")
    if not compute_grad:
        return loss, None
    valid = (y != IGNORE_INDEX).unsqueeze(1)
    grad = torch.softmax(logits32, dim=-1)
    grad.scatter_add_(1, y.clamp(min=0).unsqueeze(1), -valid.to(acc_dtype))  # − one-hot, static shapes
    grad.mul_(valid / n_valid)
    return loss, grad.to(logits.dtype)


_compiled_chunk = None


def _chunk_loss_and_grad(logits, y, n_valid, acc_dtype, compute_grad):
    """On CUDA the chunk's elementwise work (upcast, softmax, one-hot, scale, downcast) runs as one Triton kernel
    that reads the ``[chunk, vocab]`` logits twice and overwrites them with their gradient (inductor's version of
    the same maths made three passes at about a third of memory bandwidth: ~21 of 182 ms per step at 125M micro-
    batch 32); without Triton it is compiled, and off CUDA it runs eagerly."""
    global _compiled_chunk
    if not logits.is_cuda:
        return _chunk_loss_and_grad_eager(logits, y, n_valid, acc_dtype, compute_grad)
    if triton_kernels.AVAILABLE and acc_dtype == torch.float32:
        losses = triton_kernels.cross_entropy_(logits, y, (1.0 / n_valid).reshape(1), IGNORE_INDEX, compute_grad)
        return losses.sum(), (logits if compute_grad else None)
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk_loss_and_grad_eager, dynamic=False)
    return _compiled_chunk(logits, y, n_valid, acc_dtype, compute_grad)


def _add_matmul_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for an fp32 ``acc`` and lower-precision ``a``, ``b``. On CUDA the GEMM adds its fp32
    accumulator into ``acc`` itself (cuBLAS with an fp32 output and beta = 1): no bf16 product to write, upcast and
    add — three passes over a [vocab, d] tensor per chunk — and no rounding of each chunk's product to bf16."""
    if acc.is_cuda and a.dtype != acc.dtype:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc += (a @ b).to(acc.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int,
                compute_grad: bool) -> torch.Tensor:
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32 for bf16/fp16, fp64 stays fp64
        n_valid = (labels != IGNORE_INDEX).sum().clamp(min=1).to(acc_dtype)
        loss = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if compute_grad else None
        grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if compute_grad else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]
            y = labels[start:start + chunk_size]
            logits = h @ weight.t()  # (chunk, vocab), in the compute dtype
            chunk_loss, grad_logits = _chunk_loss_and_grad(logits, y, n_valid, acc_dtype, compute_grad)
            loss += chunk_loss
            if compute_grad:
                grad_hidden[start:start + chunk_size] = grad_logits @ weight
                _add_matmul_(grad_weight, grad_logits.t(), h)
        if compute_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight * grad_loss.to(grad_weight.dtype), \
            None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_size: int = 4096) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels`` (``IGNORE_INDEX`` entries skipped).

    hidden: (tokens, d), weight: (vocab, d), labels: (tokens,).
    """
    compute_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_size, compute_grad)


def cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain formula, materialising all fp32 logits; for tests."""
    logits = (hidden @ weight.t()).to(torch.promote_types(hidden.dtype, torch.float32))
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
