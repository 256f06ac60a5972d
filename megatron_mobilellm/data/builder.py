"""From ``--data-path``/``--split`` to train/valid/test datasets and rank-local data loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megatron_mobilellm.data.blended_dataset import BlendedDataset
from megatron_mobilellm.data.gpt_dataset import SPLIT_NAMES, GPTDataset, parse_split, split_ranges
from megatron_mobilellm.data.indexed_dataset import IndexedDataset
from megatron_mobilellm.data.sampler import GlobalBatchSampler


def parse_data_path(data_path: list[str]) -> tuple[list[float] | None, list[str]]:
    """``[W1, P1, W2, P2, ...]`` → (weights, prefixes); ``[P1, P2, ...]`` → (None, prefixes)."""
    if not data_path:
        raise ValueError("--data-path: no dataset given")

    def is_number(s: str) -> bool:
        try:
            float(s)
            return True
        except ValueError:
            return False

    if not is_number(data_path[0]):
        bad = [s for s in data_path if is_number(s)]
        if bad:
            raise ValueError(f"--data-path: {bad[0]!r} looks like a weight, but the list does not start with one; "
                             "use 'W1 PREFIX1 W2 PREFIX2 ...' or only prefixes")
        return None, list(data_path)
    if len(data_path) % 2:
        raise ValueError(f"--data-path: weight {data_path[-1]!r} has no dataset prefix after it")
    weights, prefixes = [], []
    for w, p in zip(data_path[::2], data_path[1::2]):
        if not is_number(w) or is_number(p):
            raise ValueError(f"--data-path: expected 'WEIGHT PREFIX' pairs, got {w!r} {p!r}")
        if float(w) < 0:
            raise ValueError(f"--data-path: negative weight {w}")
        weights.append(float(w))
        prefixes.append(p)
    if sum(weights) <= 0:
        raise ValueError("--data-path: weights sum to zero")
    return weights, prefixes


def open_datasets(prefixes: list[str]) -> list[IndexedDataset]:
    """Open (and validate) every prefix up front, so a bad file fails before any expensive work."""
    return [IndexedDataset(p) for p in prefixes]


def build_datasets(data_path: list[str], split: str, seq_length: int, seed: int, num_samples: dict[str, int],
                   cache_dir: str | Path | None = None) -> dict[str, torch.utils.data.Dataset | None]:
    """Train/valid/test datasets; a split with weight 0 or 0 requested samples is None."""
    weights, prefixes = parse_data_path(data_path)
    indexed = open_datasets(prefixes)
    split_weights = parse_split(split)
    ranges = [split_ranges(len(ds), split_weights) for ds in indexed]
    if weights is None:  # plain prefixes: weigh by the tokens each contributes
        weights = [float(ds.num_tokens) for ds in indexed]
    out: dict[str, torch.utils.data.Dataset | None] = {}
    for s, name in enumerate(SPLIT_NAMES):
        n = num_samples.get(name, 0)
        usable = [d for d in range(len(indexed)) if ranges[d][s][1] > ranges[d][s][0] and weights[d] > 0]
        if n <= 0 or not usable:
            out[name] = None
            continue

        def make(d: int, count: int, name: str = name, s: int = s) -> GPTDataset:
            start, end = ranges[d][s]
            cache = cache_dir or Path(f"{indexed[d].prefix}_cache")
            return GPTDataset(indexed[d], name, np.arange(start, end), seq_length, count, seed, cache)

        if len(usable) == 1:
            out[name] = make(usable[0], n)
        else:
            w = [weights[d] if d in usable else 0.0 for d in range(len(indexed))]
            cache = cache_dir or Path(f"{indexed[0].prefix}_cache")
            desc = dict(prefixes=[str(Path(p).resolve()) for p in prefixes], split=name, seed=seed,
                        seq_length=seq_length)
            out[name] = BlendedDataset(w, n, make, desc, cache)
    return out


def build_loader(dataset: torch.utils.data.Dataset, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, num_workers: int = 2) -> torch.utils.data.DataLoader:
    sampler = GlobalBatchSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available(),
                                       persistent_workers=num_workers > 0)
