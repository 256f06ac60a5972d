"""The benchmark's baselines: transformers' ``LlamaForCausalLM`` with our shapes, as a user would train it.

Each baseline is the plain PyTorch training step a user writes around transformers (bf16 autocast, SDPA
attention, torch's fused AdamW, gradient clipping at 1.0), in one of three forms:

- ``eager``: as is;
- ``compile``: the model under ``torch.compile`` (inductor's default mode);
- ``liger``: Liger-kernel's Triton RMSNorm, SwiGLU, RoPE and fused linear cross-entropy patched into the Llama
  classes (``apply_liger_kernel_to_llama``), eager. Used when ``liger_kernel`` imports, else reported as not
  installed: it is an optional package.

The benchmark runs each in its own process (see ``megatron_mobilellm.benchmark``): a baseline timed in the same
process after another compiled model ran ~45 % slower on an H200 than the same code in a fresh process.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from megatron_mobilellm.config import ModelConfig
from megatron_mobilellm.model.hf_adapter import hf_config_dict

BASELINES = ("eager", "compile", "liger")


class BaselineUnavailable(RuntimeError):
    """The baseline cannot run here (an optional package is missing, or it needs a GPU); a table row, not a crash."""


def _patch_liger(device: torch.device) -> None:
    if importlib.util.find_spec("liger_kernel") is None:
        raise BaselineUnavailable("not installed")
    if device.type != "cuda":
        raise BaselineUnavailable("needs CUDA (Triton kernels)")
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama()  # patches transformers' Llama classes before the model is built


def transformers_step(kind: str, cfg: ModelConfig, tokens: torch.Tensor, device: torch.device
                      ) -> tuple[Callable[[], None], torch.nn.Module]:
    """One full training step of the ``kind`` baseline on ``tokens`` (b, s), and the model (kept alive by the
    caller while it times the step)."""
    import transformers

    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; choose one of {BASELINES}")
    if kind == "liger":
        _patch_liger(device)
    hf_cfg = transformers.LlamaConfig(**hf_config_dict(cfg), attn_implementation="sdpa")
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    forward = torch.compile(model) if kind == "compile" else model
    cuda = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = forward(input_ids=tokens, labels=tokens).loss  # transformers shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model
