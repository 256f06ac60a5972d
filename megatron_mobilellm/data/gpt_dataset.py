"""Fixed-length language-modelling samples over an indexed dataset, with Megatron's semantics.

The documents of one split are shuffled (per epoch, as many epochs as the requested samples need), concatenated
into one token stream, and cut into samples of ``seq_length + 1`` tokens: sample ``i`` covers stream positions
``[i·s, i·s + s]``, so consecutive samples share one boundary token and documents are packed across sample
boundaries. ``tokens = sample[:-1]``, ``labels = sample[1:]``. Samples are then shuffled.

Three arrays describe this, as in Megatron: ``document_index`` (the shuffled document order), ``sample_index``
(``[num_samples + 1, 2]``: document position and offset where each sample starts; sample ``i`` ends where
``i + 1`` starts) and ``shuffle_index``. They are built with numpy alone (a cumulative sum and a binary search
instead of Megatron's C++ helper) and cached.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megatron_mobilellm.data.index_cache import cached_arrays
from megatron_mobilellm.data.indexed_dataset import IndexedDataset, bin_path

INDEX_VERSION = 1
SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split: str) -> list[float]:
    """``"969,30,1"`` → normalised weights for train/valid/test (missing entries are 0)."""
    try:
        parts = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        raise ValueError(f"--split {split!r}: expected up to three comma-separated numbers") from None
    if len(parts) > 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"--split {split!r}: expected up to three non-negative numbers with a positive sum")
    parts += [0.0] * (3 - len(parts))
    return [p / sum(parts) for p in parts]


def split_ranges(num_documents: int, weights: list[float]) -> list[tuple[int, int]]:
    """Contiguous document ranges per split (Megatron's rounding, the last range absorbing the remainder)."""
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w * num_documents)))
    shift = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - shift for b in bounds[1:]]
    return [(max(bounds[i], 0), max(bounds[i + 1], 0)) for i in range(len(weights))]


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    if tokens_per_epoch <= 1:
        raise ValueError("the split holds too few tokens to form a single sample")
    # E epochs give (E * tokens - 1) // seq_length samples (one extra token for the last label).
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.Generator) -> np.ndarray:
    """Each epoch's documents, shuffled independently, one epoch after another."""
    dtype = np.int32 if documents.size == 0 or documents.max() < 2**31 else np.int64
    index = np.tile(documents.astype(dtype), num_epochs).reshape(num_epochs, -1)
    for epoch in index:
        rng.shuffle(epoch)
    return index.reshape(-1)


def build_sample_index(lengths: np.ndarray, document_index: np.ndarray, seq_length: int,
                       num_samples: int) -> np.ndarray:
    """``[num_samples + 1, 2]`` (position in ``document_index``, token offset) of every sample start."""
    doc_ends = np.cumsum(lengths[document_index], dtype=np.int64)  # exclusive end of each doc in the stream
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    if starts[-1] >= doc_ends[-1]:
        raise ValueError(f"{num_samples} samples need {starts[-1] + 1} tokens; the stream has {doc_ends[-1]}")
    pos = np.searchsorted(doc_ends, starts, side="right")  # first doc ending after the position (skips empty docs)
    doc_starts = doc_ends - lengths[document_index]
    out = np.empty((num_samples + 1, 2), dtype=np.int64)
    out[:, 0] = pos
    out[:, 1] = starts - doc_starts[pos]
    return out


class GPTDataset(torch.utils.data.Dataset):
    """Samples of one split of one indexed dataset. ``ds[i]`` → ``{"tokens", "labels"}`` int64 tensors."""

    def __init__(self, indexed: IndexedDataset, split: str, documents: np.ndarray, seq_length: int,
                 num_samples: int, seed: int, cache_dir: str | Path | None = None):
        self.indexed, self.seq_length, self.num_samples = indexed, seq_length, num_samples
        self.split = split
        lengths = indexed.sequence_lengths
        tokens_per_epoch = int(lengths[documents].sum(dtype=np.int64)) if documents.size else 0
        if tokens_per_epoch <= 1:
            raise ValueError(f"{indexed.prefix}: the {split} split has no tokens "
                             f"({documents.size} documents); adjust --split")
        description = dict(version=INDEX_VERSION, prefix=str(Path(indexed.prefix).resolve()), split=split,
                           bin_size=bin_path(indexed.prefix).stat().st_size, num_sequences=len(indexed),
                           first_document=int(documents[0]), num_documents=int(documents.size),
                           seq_length=seq_length, num_samples=num_samples, seed=seed)

        def build() -> dict[str, np.ndarray]:
            rng = np.random.default_rng(seed)
            epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
            doc_index = build_document_index(documents, epochs, rng)
            sample_index = build_sample_index(lengths, doc_index, seq_length, num_samples)
            shuffle_index = rng.permutation(num_samples).astype(np.int64)
            return {"document_index": doc_index, "sample_index": sample_index, "shuffle_index": shuffle_index}

        cache_dir = cache_dir or Path(f"{indexed.prefix}_cache")
        arrays = cached_arrays(cache_dir, description, ["document_index", "sample_index", "shuffle_index"], build)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def __len__(self) -> int:
        return self.num_samples

    def sample_tokens(self, i: int) -> np.ndarray:
        """The ``seq_length + 1`` tokens of sample ``i`` (after shuffling)."""
        j = int(self.shuffle_index[i])
        (d0, o0), (d1, o1) = self.sample_index[j], self.sample_index[j + 1]
        doc = self.document_index
        if d0 == d1:
            return self.indexed.get(int(doc[d0]), int(o0), int(o1 - o0 + 1))
        parts = [self.indexed.get(int(doc[d0]), int(o0))]
        parts += [self.indexed.get(int(doc[d])) for d in range(d0 + 1, d1)]
        parts.append(self.indexed.get(int(doc[d1]), 0, int(o1 + 1)))
        return np.concatenate(parts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = torch.from_numpy(self.sample_tokens(i).astype(np.int64))
        return {"tokens": sample[:-1], "labels": sample[1:]}
