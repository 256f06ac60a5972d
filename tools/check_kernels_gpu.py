#!/usr/bin/env python
"""GPU check of the fused kernels against fp32 references (run on a CUDA machine; CI covers the CPU paths).

    python tools/check_kernels_gpu.py
"""

from __future__ import annotations

import torch

from megatron_mobilellm.model.attention import attention, resolve_backend
from megatron_mobilellm.model.loss import cross_entropy_reference, linear_cross_entropy
from megatron_mobilellm.model.swiglu import swiglu, swiglu_reference


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA device"
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
        for backend in backends:
            if backend == "cudnn" and dtype == torch.float32:
                continue  # cuDNN attention is a half-precision kernel
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
