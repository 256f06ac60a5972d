"""Check an export by running it: transformers' model on the written files vs ours on the same weights."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_mobilellm.config import ModelConfig
from megatron_mobilellm.convert.hf_format import read_hf
from megatron_mobilellm.model import MobileLLM
from megatron_mobilellm.model.hf_adapter import hf_config_dict, to_hf


def load_ours(state: dict[str, torch.Tensor], cfg: ModelConfig) -> MobileLLM:
    model = MobileLLM(cfg, attention_backend="eager")
    model.load_state_dict(state)
    return model.eval()


def load_transformers(hf_dir: str | Path, fmt: str):
    """The export as transformers sees it: ``from_pretrained`` for Llama format; MobileLLM format (remote code
    not available offline) is read back and unrolled into a ``LlamaForCausalLM``."""
    import transformers

    if fmt == "llama":
        return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    state, cfg = read_hf(hf_dir)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_dict(cfg)))
    model.load_state_dict(to_hf(state, cfg), strict=False)
    model.tie_weights()
    return model.eval()


@torch.no_grad()
def max_logit_difference(hf_dir: str | Path, state: dict[str, torch.Tensor], cfg: ModelConfig, fmt: str,
                         dtype: torch.dtype, batch: int = 2, seq: int = 32, seed: int = 0) -> float:
    """max |Δlogits| in fp32 between the export and our model holding the same (export-rounded) weights."""
    ours = load_ours({k: v.to(dtype).float() for k, v in state.items()}, cfg)
    theirs = load_transformers(hf_dir, fmt)
    ids = torch.randint(0, cfg.vocab_size, (batch, min(seq, cfg.max_position_embeddings)),
                        generator=torch.Generator().manual_seed(seed))
    return (ours(ids) - theirs(ids).logits.float()).abs().max().item()
