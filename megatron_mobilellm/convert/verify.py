"""Check an export by running it: transformers' model (HF folder) or llama.cpp (GGUF file) on the written files vs
ours on the same weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

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


DEFAULT_PROMPTS = ("Return the number of", "The default value is", "This module provides the",
                   "If the file does not exist,")


@dataclass
class PromptAgreement:
    """One prompt run through our model and through llama.cpp."""

    prompt: str
    same_tokenization: bool
    """llama.cpp's tokenizer (from the file) gives the ids SentencePiece gives, BOS included."""
    agreed: int
    """Greedy tokens identical before the first difference."""
    generated: int
    max_logit_diff: float
    """max |Δlogits| over the prompt and our greedy continuation, both models fed the same ids."""


def _greedy(next_logits: Callable[[list[int]], torch.Tensor], ids: list[int], new_tokens: int) -> list[int]:
    out = list(ids)
    for _ in range(new_tokens):
        out.append(int(next_logits(out).argmax()))
    return out


def _llama_cpp_next_logits(llm) -> Callable[[list[int]], torch.Tensor]:
    """Next-token logits from llama.cpp, feeding only the ids its KV cache has not seen."""
    llm.reset()

    def next_logits(ids: list[int]) -> torch.Tensor:
        llm.eval(ids[llm.n_tokens:])
        return torch.from_numpy(llm.scores[llm.n_tokens - 1])

    return next_logits


@torch.no_grad()
def llama_cpp_agreement(gguf_path: str | Path, state: dict[str, torch.Tensor], cfg: ModelConfig,
                        tokenizer_model: str | Path, prompts: Sequence[str] = DEFAULT_PROMPTS,
                        new_tokens: int = 16) -> list[PromptAgreement]:
    """Greedy continuations and logits of the GGUF in llama.cpp against our model on the original weights."""
    import llama_cpp
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
    ours = load_ours(state, cfg)
    encoded = [[sp.bos_id(), *sp.encode(p)] for p in prompts]
    n_ctx = max(map(len, encoded)) + new_tokens
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False)
    results = []
    for text, ids in zip(prompts, encoded):
        reference = _greedy(lambda seq: ours(torch.tensor([seq]))[0, -1], ids, new_tokens)
        theirs = _greedy(_llama_cpp_next_logits(llm), ids, new_tokens)
        fed = reference[:-1]
        llm.reset()
        llm.eval(fed)
        diff = (ours(torch.tensor([fed]))[0] - torch.from_numpy(llm.scores[:len(fed)])).abs().max().item()
        pairs = list(zip(reference[len(ids):], theirs[len(ids):]))
        agreed = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
        same = llm.tokenize(text.encode(), add_bos=True, special=False) == ids
        results.append(PromptAgreement(text, same, agreed, len(pairs), diff))
    llm.close()
    return results
