"""Token perplexity over non-overlapping windows, and bits per byte.

The original MobileLLM evaluation (WikiText-2) tokenizes the whole text once and scores it in consecutive windows
of ``seq_length`` tokens that do not overlap. Here window k reads tokens ``[kL, kL + L)`` and predicts
``[kL + 1, kL + L]``, so every token after the first is scored exactly once (the last window is shorter).
Perplexity depends on the tokenizer; bits per byte (total negative log-likelihood in bits over the UTF-8 bytes of
the scored text) does not, so models with different vocabularies compare on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from megatron_mobilellm.data.indexed_dataset import IndexedDataset
from megatron_mobilellm.errors import DatasetFormatError, EvaluationError


@dataclass
class PerplexityResult:
    seq_length: int
    windows: int
    tokens: int
    """Scored (predicted) tokens."""
    nll: float
    """Sum of the negative log-likelihood of the scored tokens, in nats."""
    bytes: int
    """UTF-8 bytes of the text the scored tokens spell."""

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    def to_dict(self) -> dict:
        return {"seq_length": self.seq_length, "windows": self.windows, "tokens": self.tokens, "nll": self.nll,
                "bytes": self.bytes, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


@torch.no_grad()
def window_nll(model: torch.nn.Module, ids: torch.Tensor, seq_length: int, batch_size: int,
               max_windows: int | None = None) -> tuple[float, int, int]:
    """(summed NLL in nats, scored tokens, windows) of the 1-D token ``ids`` under a transformers causal LM."""
    if ids.numel() < 2:
        raise EvaluationError("the text has fewer than two tokens: nothing to score")
    starts = list(range(0, ids.numel() - 1, seq_length))[:max_windows]
    device = next(model.parameters()).device
    nll, scored = 0.0, 0
    full = starts if starts[-1] + seq_length < ids.numel() else starts[:-1]
    batches = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [starts[len(full):]] if len(full) < len(starts) else []  # the shorter last window on its own
    for batch in tqdm(batches, desc="perplexity", unit="batch"):
        end = min(batch[0] + seq_length, ids.numel() - 1)
        span = end - batch[0]
        chunk = torch.stack([ids[s:s + span + 1] for s in batch]).to(device)  # (b, span + 1)
        logits = model(chunk[:, :-1]).logits.float()  # (b, span, vocab)
        nll += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
        scored += chunk[:, 1:].numel()
    return nll, scored, len(starts)


def check_seq_length(model: torch.nn.Module, seq_length: int | None) -> int:
    """``--seq-length``, by default the model's context (2048 for the paper's models)."""
    context = model.config.max_position_embeddings
    if seq_length is None:
        return context
    if not 1 <= seq_length <= context:
        raise EvaluationError(f"--seq-length {seq_length} must be in [1, {context}] (the model's context) "
                              "(--seq-length)")
    return seq_length


def text_perplexity(model: torch.nn.Module, tokenizer, path: str | Path, seq_length: int, batch_size: int,
                    max_windows: int | None = None) -> PerplexityResult:
    """A UTF-8 text file, tokenized as a whole (with the tokenizer's BOS)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvaluationError(f"cannot read the text: {e.__class__.__name__} ({path})") from None
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    nll, tokens, windows = window_nll(model, ids, seq_length, batch_size, max_windows)
    covered = tokenizer.decode(ids[:tokens + 1], skip_special_tokens=True) if max_windows else text
    return PerplexityResult(seq_length, windows, tokens, nll, len(covered.encode("utf-8")))


def dataset_perplexity(model: torch.nn.Module, tokenizer, prefix: str | Path, seq_length: int, batch_size: int,
                       max_windows: int | None = None) -> PerplexityResult:
    """A ``.bin/.idx`` dataset's documents back to back, as stored (their BOS/EOS included)."""
    try:
        ds = IndexedDataset(prefix)
    except (DatasetFormatError, FileNotFoundError) as e:
        raise EvaluationError(f"{e} (--data-path)") from None
    vocab = model.config.vocab_size
    need = max_windows * seq_length + 1 if max_windows else ds.num_tokens
    docs, have = [], 0
    for i in range(len(ds)):  # only as many documents as the windows read
        if have >= need:
            break
        docs.append(ds[i])
        have += len(docs[-1])
    ids = torch.from_numpy(np.concatenate(docs or [np.zeros(0)]).astype(np.int64))
    if ids.numel() and int(ids.max()) >= vocab:
        raise EvaluationError(f"token id {int(ids.max())} is outside the model's vocabulary of {vocab} ({prefix})")
    nll, tokens, windows = window_nll(model, ids, seq_length, batch_size, max_windows)
    text = tokenizer.decode(ids[:tokens + 1], skip_special_tokens=True)
    return PerplexityResult(seq_length, windows, tokens, nll, len(text.encode("utf-8")))


def format_result(result: PerplexityResult, source: str) -> str:
    return (f"{source}: {result.tokens:,} tokens in {result.windows} windows of {result.seq_length} | "
            f"perplexity {result.perplexity:.4f} | bits per byte {result.bits_per_byte:.4f} "
            f"({result.bytes:,} bytes)")
