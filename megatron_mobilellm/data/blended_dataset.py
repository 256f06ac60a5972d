"""Deterministic mixing of several datasets by weight (``--data-path 0.7 A 0.3 B``).

Sample ``i`` goes to the dataset furthest behind its target share, ``argmax_d(w_d·(i+1) − count_d)`` (Megatron's
rule), which keeps every prefix of the stream within about one sample of the exact proportions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from megatron_mobilellm.data.index_cache import cached_arrays


def blend_assignment(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset of each sample, index of that sample within its dataset)."""
    w = [x / sum(weights) for x in weights]
    counts = [0] * len(w)
    dataset_index = np.empty(size, dtype=np.int16)
    sample_index = np.empty(size, dtype=np.int64)
    order = range(len(w))
    for i in range(size):  # sequential by nature; ~1 s per million samples, cached afterwards
        target = i + 1
        d = max(order, key=lambda k: w[k] * target - counts[k])
        dataset_index[i] = d
        sample_index[i] = counts[d]
        counts[d] += 1
    return dataset_index, sample_index


class BlendedDataset(torch.utils.data.Dataset):
    def __init__(self, weights: list[float], size: int, make_dataset: Callable[[int, int], torch.utils.data.Dataset],
                 description: dict, cache_dir: str | Path):
        """``make_dataset(d, n)`` builds dataset ``d`` with exactly the ``n`` samples the blend draws from it."""
        arrays = cached_arrays(cache_dir, {**description, "weights": weights, "size": size, "kind": "blend"},
                               ["dataset_index", "dataset_sample_index"],
                               lambda: dict(zip(("dataset_index", "dataset_sample_index"),
                                                blend_assignment(weights, size))))
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        counts = np.bincount(self.dataset_index, minlength=len(weights))
        self.datasets = [make_dataset(d, int(n)) if n else None for d, n in enumerate(counts)]
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]
