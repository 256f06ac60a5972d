#!/usr/bin/env python
"""GPU check of the fused kernels against fp32 references (run on a CUDA machine; CI covers the CPU paths).

    python tools/check_kernels_gpu.py            # every kernel vs its fp32 reference
    python tools/check_kernels_gpu.py --bench    # also time causal GQA attention fwd+bwd per kernel, 125M's shape

Optional kernels (flash-attn-4's ``fa4``) are checked when they import.
"""

from __future__ import annotations

import argparse

import torch

from megatron_mobilellm.model import fa4
from megatron_mobilellm.model.attention import attention, resolve_backend
from megatron_mobilellm.model.loss import cross_entropy_reference, linear_cross_entropy
from megatron_mobilellm.model.swiglu import swiglu, swiglu_reference


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def bench_attention(batch: int = 16, heads: int = 9, groups: int = 3, seq: int = 2048, dim: int = 64) -> None:
    """Forward+backward TFLOP/s (causal FLOPs) of each available attention kernel, CUDA-event timed."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q = torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(batch, groups, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    go = torch.randn(batch, seq, heads * dim, device="cuda", dtype=torch.bfloat16)
    mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, seq, seq, device="cuda")
    flex = torch.compile(flex_attention)

    def flex_fn(q, k, v):
        return flex(q, k, v, block_mask=mask, enable_gqa=True).transpose(1, 2).reshape(batch, seq, -1)

    kernels = {"cudnn": lambda *t: attention(*t, "cudnn"), "sdpa (flash)": lambda *t: attention(*t, "sdpa"),
               "flex": flex_fn}
    if fa4.AVAILABLE:
        kernels["fa4"] = lambda *t: attention(*t, "fa4")
    flops = 4 * batch * heads * seq * seq * dim / 2 * 3.5  # fwd (2 matmuls) + bwd (5), causal half
    for name, fn in kernels.items():
        def step():
            torch.autograd.grad(fn(q, k, v), (q, k, v), go)
        for _ in range(3):
            step()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            step()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / 20
        print(f"attention {name:<14} fwd+bwd {ms:7.3f} ms  {flops / ms / 1e9:6.0f} TFLOP/s  "
              f"(b{batch} s{seq} {heads}/{groups} heads, d{dim}, causal)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", action="store_true", help="also time attention fwd+bwd per kernel")
    opts = p.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    print(f"flash-attn-4 (fa4): {'available' if fa4.AVAILABLE else 'not installed'}")
    if opts.bench:
        bench_attention()
    torch.manual_seed(0)
    rows = []
    for dtype, budget in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        x = torch.randn(16 * 2048, 2 * 1536, device="cuda", dtype=dtype, requires_grad=True)
        g = torch.randn(16 * 2048, 1536, device="cuda", dtype=dtype)
        x32 = x.detach().float().requires_grad_()
        out, ref = swiglu(x, backend="triton"), swiglu_reference(x32)
        (dx,), (dref,) = torch.autograd.grad(out, x, g), torch.autograd.grad(ref, x32, g.float())
        rows.append(("swiglu fwd", dtype, rel_err(out, ref), budget))
        rows.append(("swiglu bwd", dtype, rel_err(dx, dref), budget))
        h = torch.randn(8192, 576, device="cuda", dtype=dtype, requires_grad=True)
        w = (0.02 * torch.randn(32000, 576, device="cuda", dtype=dtype)).requires_grad_()
        y = torch.randint(0, 32000, (8192,), device="cuda")
        h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
        loss, ref_loss = linear_cross_entropy(h, w, y, 2048), cross_entropy_reference(h32, w32, y)
        gh, gw = torch.autograd.grad(loss, (h, w))
        gh32, gw32 = torch.autograd.grad(ref_loss, (h32, w32))
        rows.append(("linear CE loss", dtype, abs(loss.item() - ref_loss.item()) / ref_loss.item(), budget))
        rows.append(("linear CE d_hidden", dtype, rel_err(gh, gh32), budget))
        rows.append(("linear CE d_weight", dtype, rel_err(gw, gw32), budget))
        q = torch.randn(4, 9, 2048, 64, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(4, 3, 2048, 64, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(4, 3, 2048, 64, device="cuda", dtype=dtype, requires_grad=True)
        go = torch.randn(4, 2048, 9 * 64, device="cuda", dtype=dtype)
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref = attention(q32, k32, v32, "eager")
        ref_grads = torch.autograd.grad(ref, (q32, k32, v32), go.float())
        backends = ["sdpa"] + (["cudnn"] if resolve_backend("auto", q.device) == "cudnn" else [])
        backends += ["fa4"] if fa4.AVAILABLE else []
        for backend in backends:
            if backend in ("cudnn", "fa4") and dtype == torch.float32:
                continue  # half-precision kernels
            out = attention(q, k, v, backend)
            grads = torch.autograd.grad(out, (q, k, v), go)
            rows.append((f"attention {backend} fwd", dtype, rel_err(out, ref), budget))
            rows.append((f"attention {backend} dq", dtype, rel_err(grads[0], ref_grads[0]), budget))
            rows.append((f"attention {backend} dk,dv", dtype, max(rel_err(grads[1], ref_grads[1]),
                                                                 rel_err(grads[2], ref_grads[2])), budget))
    ok = True
    for name, dtype, err, budget in rows:
        good = err <= budget and err == err
        ok &= good
        print(f"{name:<22}{str(dtype):<16} rel err {err:.2e}  (budget {budget:.0e})  {'ok' if good else 'FAIL'}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
