"""Greedy and nucleus (top-p) sampling with our model, for a quick look at a checkpoint.

No KV cache: each new token re-runs the (short) sequence. This is a debugging aid, not a serving path — export to
Hugging Face for real inference.
"""

from __future__ import annotations

import torch

from megatron_mobilellm.model import MobileLLM


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # smallest prefix whose mass reaches top_p
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice])


@torch.no_grad()
def generate(model: MobileLLM, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: int | None = None, seed: int = 0) -> list[int]:
    """The prompt followed by up to ``max_new_tokens`` generated ids (stopping after ``eos_id``)."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed) if temperature > 0 else None
    ids = list(prompt)
    window = model.config.max_position_embeddings
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids[-window:]], device=device))[0, -1]
        ids.append(sample_next(logits, temperature, top_p, generator))
        if ids[-1] == eos_id:
            break
    return ids
