"""Fixed-length language-modelling samples over an indexed dataset, sample for sample megatron-core's GPTDataset.

The documents of one split are repeated for as many epochs as the requested samples need, shuffled, concatenated
into one token stream and cut into samples of ``seq_length + 1`` tokens: sample ``i`` covers stream positions
``[i·s, i·s + s]``, so consecutive samples share one boundary token and documents are packed across sample
boundaries. ``tokens = sample[:-1]``, ``labels = sample[1:]``. Every sample of the built epochs is then shuffled.

Shuffling follows megatron-core 0.16 exactly, so sample ``i`` here is sample ``i`` there for the same data, split,
sequence length and seed: one ``numpy.random.RandomState(seed)`` (MT19937) per split shuffles the documents of all
full epochs together; a last epoch of which less than 80 % of the samples are used is shuffled on its own
(``separate_final_epoch``), documents and samples, so the requested samples hold every full epoch exactly once
and a random part of the last. Split boundaries are ``round(cumulative fraction × N)`` documents.

Three arrays describe this, as in Megatron: ``document_index`` (the shuffled document order), ``sample_index``
(``[num_samples + 1, 2]``: document position and offset where each sample starts; sample ``i`` ends where
``i + 1`` starts) and ``shuffle_index``. They are built with numpy alone (a cumulative sum and a binary search
give the same sample starts as Megatron's C++ ``build_sample_idx``) and cached.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megatron_mobilellm.data.index_cache import cached_arrays, default_cache_dir
from megatron_mobilellm.data.indexed_dataset import IndexedDataset
from megatron_mobilellm.errors import DatasetFormatError

INDEX_VERSION = 2
SPLIT_NAMES = ("train", "valid", "test")
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80  # megatron-core's constant


def normalize(weights: list[float]) -> list[float]:
    """Weights divided by their sum in float64, as megatron-core does (its blends depend on the exact floats)."""
    w = np.asarray(weights, dtype=np.float64)
    return (w / w.sum()).tolist()


def parse_split(split: str) -> list[float]:
    """``"969,30,1"`` → normalised weights for train/valid/test (missing entries are 0)."""
    try:
        parts = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        raise ValueError(f"--split {split!r}: expected up to three comma-separated numbers") from None
    if len(parts) > 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"--split {split!r}: expected up to three non-negative numbers with a positive sum")
    return normalize(parts + [0.0] * (3 - len(parts)))


def split_ranges(num_documents: int, weights: list[float]) -> list[tuple[int, int] | None]:
    """Contiguous document ranges per split; ``None`` for a split of weight 0.

    megatron-core's rule: the bounds are ``round(cumulative fraction × N)``, so a split with a positive weight can
    still be empty on a small dataset (it is then ``(k, k)``, not ``None``).
    """
    out: list[tuple[int, int] | None] = []
    begin = 0.0
    for w in weights:
        end = begin + w
        out.append((int(round(begin * num_documents)), int(round(end * num_documents))) if end > begin else None)
        begin = end
    return out


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int | None) -> int:
    """Fewest epochs whose tokens give ``num_samples`` samples (one epoch when no count is requested)."""
    if tokens_per_epoch <= 1:
        raise ValueError("the split holds too few tokens to form a single sample")
    if num_samples is None:
        return 1
    # E epochs give (E * tokens - 1) // seq_length samples (one extra token for the last label).
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def samples_in(tokens: int, seq_length: int) -> int:
    return (tokens - 1) // seq_length


def separate_final_epoch(tokens_per_epoch: int, seq_length: int, num_epochs: int, num_samples: int | None) -> bool:
    """Whether the last epoch is used for so few samples that it is shuffled apart from the full ones."""
    if num_epochs == 1 or num_samples is None:
        return False
    from_final_epoch = num_samples - samples_in((num_epochs - 1) * tokens_per_epoch, seq_length)
    per_epoch = samples_in(tokens_per_epoch, seq_length)
    return from_final_epoch < int(SEPARATE_FINAL_EPOCH_THRESHOLD * per_epoch)


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                         separate_final: bool = False) -> np.ndarray:
    """The documents of ``num_epochs`` epochs, shuffled together (the last epoch apart if ``separate_final``)."""
    if separate_final and num_epochs > 1:
        return np.concatenate([build_document_index(documents, num_epochs - 1, rng),
                               build_document_index(documents, 1, rng)])
    dtype = np.int32 if documents.size == 0 or documents.max() < 2**31 else np.int64
    index = np.tile(documents.astype(dtype), num_epochs)
    rng.shuffle(index)
    return index


def build_sample_index(lengths: np.ndarray, document_index: np.ndarray, seq_length: int,
                       num_samples: int) -> np.ndarray:
    """``[num_samples + 1, 2]`` (position in ``document_index``, token offset) of every sample start."""
    doc_lengths = lengths[document_index].astype(np.int64)
    doc_ends = np.cumsum(doc_lengths)  # exclusive end of each document in the stream
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    if starts[-1] >= doc_ends[-1]:
        raise ValueError(f"{num_samples} samples need {starts[-1] + 1} tokens; the stream has {doc_ends[-1]}")
    pos = np.searchsorted(doc_ends, starts, side="right")  # first document ending after the position
    out = np.empty((num_samples + 1, 2), dtype=np.int64)
    out[:, 0] = pos
    out[:, 1] = starts - (doc_ends - doc_lengths)[pos]
    out[0] = 0  # Megatron starts at the first document even when it is empty (same tokens either way)
    return out


def build_shuffle_index(num_samples: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    """A permutation of ``[0, num_samples)`` followed by one of ``[num_samples, total)``."""
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total:
        return first
    last = np.arange(num_samples, total, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate([first, last])


def build_indices(lengths: np.ndarray, documents: np.ndarray, seq_length: int, num_samples: int | None,
                  seed: int) -> dict[str, np.ndarray]:
    """Document, sample and shuffle index of one split, exactly as megatron-core builds them."""
    tokens_per_epoch = int(lengths[documents].sum(dtype=np.int64))
    epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    separate = separate_final_epoch(tokens_per_epoch, seq_length, epochs, num_samples)
    rng = np.random.RandomState(seed)
    doc_index = build_document_index(documents, epochs, rng, separate)
    total = samples_in(epochs * tokens_per_epoch, seq_length)
    sample_index = build_sample_index(lengths, doc_index, seq_length, total)
    first = samples_in((epochs - 1) * tokens_per_epoch, seq_length) if separate else total
    shuffle_index = build_shuffle_index(first, total, rng)
    return {"document_index": doc_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


class GPTDataset(torch.utils.data.Dataset):
    """Samples of one split of one indexed dataset. ``ds[i]`` → ``{"tokens", "labels"}`` int64 tensors.

    ``num_samples`` is the least number wanted; like megatron-core, every sample of the epochs this needs is
    built, so ``len(ds) >= num_samples`` (``None``: one epoch).
    """

    def __init__(self, indexed: IndexedDataset, split: str, documents: np.ndarray, seq_length: int,
                 num_samples: int | None, seed: int, cache_dir: str | Path | None = None,
                 vocab_size: int | None = None):
        self.indexed, self.seq_length, self.split = indexed, seq_length, split
        # Ids that reach the embedding must be < vocab_size; a dtype that cannot hold a larger id needs no check.
        self.vocab_size = vocab_size if vocab_size is not None and np.iinfo(indexed.dtype).max >= vocab_size else None
        lengths = indexed.sequence_lengths
        tokens_per_epoch = int(lengths[documents].sum(dtype=np.int64)) if documents.size else 0
        if tokens_per_epoch <= 1:
            raise ValueError(f"{indexed.prefix}: the {split} split has no tokens "
                             f"({documents.size} documents); adjust --split")
        description = dict(version=INDEX_VERSION, dataset=indexed.identity, split=split,
                           first_document=int(documents[0]), num_documents=int(documents.size),
                           seq_length=seq_length, num_samples=num_samples, seed=seed)
        arrays = cached_arrays(cache_dir or default_cache_dir(indexed.prefix), description,
                               ["document_index", "sample_index", "shuffle_index"],
                               lambda: build_indices(lengths, documents, seq_length, num_samples, seed))
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def __len__(self) -> int:
        return len(self.shuffle_index)

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
        tokens = self.sample_tokens(i)
        if self.vocab_size is not None and tokens.max() >= self.vocab_size:
            raise DatasetFormatError(f"{self.indexed.prefix}: token id {int(tokens.max())} in sample {i} of the "
                                     f"{self.split} split is not below the model's vocabulary size {self.vocab_size}; "
                                     "was the data tokenized for another vocabulary? (--data-path, --vocab-size)")
        sample = torch.from_numpy(tokens.astype(np.int64))
        return {"tokens": sample[:-1], "labels": sample[1:]}
