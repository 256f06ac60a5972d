"""From ``--data-path``/``--split`` to train/valid/test datasets and rank-local data loaders."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_mobilellm.data.blended_dataset import BlendedDataset
from megatron_mobilellm.data.gpt_dataset import (INDEX_VERSION, SPLIT_NAMES, GPTDataset, normalize, parse_split,
                                                 samples_in, split_ranges)
from megatron_mobilellm.data.index_cache import default_cache_dir
from megatron_mobilellm.data.indexed_dataset import IndexedDataset
from megatron_mobilellm.data.sampler import GlobalBatchSampler

BLEND_SURPLUS = 0.005  # megatron-core's mid_level_dataset_surplus: extra samples each blended dataset builds


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


@dataclass
class SplitPlan:
    """Which datasets feed one split, with which document ranges and weights (``None``: unweighted)."""

    name: str
    num_samples: int
    members: list[int]
    ranges: list[tuple[int, int]]
    weights: list[float] | None


def plan_splits(indexed: list[IndexedDataset], weights: list[float] | None, split: str, seq_length: int,
                num_samples: dict[str, int]) -> tuple[dict[str, SplitPlan], list[str]]:
    """Check that every requested split can be built and say how: (plans, warnings).

    An empty train split is an error; an empty valid/test split, or one dataset of a blend with no documents
    in it, is a warning and that split (or that dataset of it) is left out. megatron-core would loop forever
    on such a split, so no sample sequence is lost by leaving it out.
    """
    split_weights = parse_split(split)
    plans, warnings = {}, []
    for s, name in enumerate(SPLIT_NAMES):
        n = num_samples.get(name, 0)
        if n <= 0:
            continue
        members, ranges, empty = [], [], []
        for d, ds in enumerate(indexed):
            if weights is not None and weights[d] == 0:
                continue
            r = split_ranges(len(ds), split_weights)[s]
            if r is None:
                break
            if int(ds.sequence_lengths[r[0]:r[1]].sum(dtype=np.int64)) <= 1:
                empty.append(f"{ds.prefix} ({r[1] - r[0]} of {len(ds)} documents)")
            else:
                members.append(d)
                ranges.append(r)
        if split_weights[s] == 0 or not members:
            why = f"--split {split} gives the {name} split " + (
                "weight 0" if split_weights[s] == 0 else "no tokens in " + ", ".join(empty))
            if name == "train":
                raise ValueError(f"{why}; training needs documents")
            warnings.append(f"{why}; the {name} split is left out" + (
                " and validation will not run" if name == "valid" else ""))
            continue
        if empty:
            if name == "train":
                raise ValueError(f"--split {split} leaves the train split of {', '.join(empty)} without "
                                 "tokens; lower the valid/test shares or drop the dataset from --data-path")
            warnings.append(f"--split {split} leaves the {name} split of {', '.join(empty)} without tokens; "
                            f"that dataset is left out of the {name} blend")
        plan = SplitPlan(name, n, members, ranges, None if weights is None else [weights[d] for d in members])
        if plan.weights is None and len(members) > 1 and name == "train":  # other splits stop short, as in Megatron
            epoch = sum(samples_in(int(indexed[d].sequence_lengths[a:b].sum(dtype=np.int64)), seq_length)
                        for d, (a, b) in zip(members, ranges))
            if epoch < n:
                raise ValueError(f"--data-path without weights blends one epoch of each dataset, {epoch} {name} "
                                 f"samples, but {n} are needed; give weights ('W1 PREFIX1 W2 PREFIX2 ...') "
                                 "to draw more")
        plans[name] = plan
    return plans, warnings


def check_data_args(data_path: list[str], split: str, seq_length: int, num_samples: dict[str, int]) -> list[str]:
    """Everything that can be wrong with ``--data-path``/``--split`` before any work starts; returns warnings."""
    weights, prefixes = parse_data_path(data_path)
    return plan_splits(open_datasets(prefixes), weights, split, seq_length, num_samples)[1]


def build_split(plan: SplitPlan, indexed: list[IndexedDataset], seq_length: int, seed: int,
                cache_dir: str | Path | None, vocab_size: int | None = None) -> torch.utils.data.Dataset:
    """One split as megatron-core's BlendedMegatronDatasetBuilder builds it (same sizes, so the same samples)."""
    def gpt(k: int, count: int | None) -> GPTDataset:
        d, (start, end) = plan.members[k], plan.ranges[k]
        return GPTDataset(indexed[d], plan.name, np.arange(start, end), seq_length, count, seed, cache_dir,
                          vocab_size)

    n = plan.num_samples
    if plan.weights is None and len(plan.members) == 1:
        return gpt(0, n)
    if plan.weights is None:  # one epoch of each, weighed by its sample count
        parts = [gpt(k, None) for k in range(len(plan.members))]
        weights, size = [float(len(p)) for p in parts], min(n, sum(len(p) for p in parts))
    else:  # each dataset builds a little more than its share, so the blend never runs past its end
        weights = normalize(plan.weights)
        targets = [math.ceil(n * w) for w in weights]
        parts = [gpt(k, math.ceil(t * (1 + BLEND_SURPLUS))) for k, t in enumerate(targets)]
        size = sum(targets)
    return BlendedDataset(parts, weights, size, {"version": INDEX_VERSION},
                          cache_dir or default_cache_dir(indexed[plan.members[0]].prefix))


def build_datasets(data_path: list[str], split: str, seq_length: int, seed: int, num_samples: dict[str, int],
                   cache_dir: str | Path | None = None,
                   vocab_size: int | None = None) -> dict[str, torch.utils.data.Dataset | None]:
    """Train/valid/test datasets, sample for sample megatron-core's for the same arguments; a split with
    weight 0, no documents or 0 requested samples is None. With ``vocab_size``, a sample holding a larger id
    raises DatasetFormatError naming its dataset, before the model sees it."""
    weights, prefixes = parse_data_path(data_path)
    indexed = open_datasets(prefixes)
    plans, _ = plan_splits(indexed, weights, split, seq_length, num_samples)
    return {name: build_split(plans[name], indexed, seq_length, seed, cache_dir, vocab_size) if name in plans
            else None for name in SPLIT_NAMES}


def build_loader(dataset: torch.utils.data.Dataset, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, num_workers: int = 2) -> torch.utils.data.DataLoader:
    sampler = GlobalBatchSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available(),
                                       persistent_workers=num_workers > 0)
