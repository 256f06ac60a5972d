"""Deterministic mixing of several datasets by weight (``--data-path 0.7 A 0.3 B``), as megatron-core blends.

Sample ``i`` goes to the dataset furthest behind its target share, ``argmax_d(w_d·max(i, 1) − count_d)`` with ties
to the lower index (megatron-core's ``build_blending_indices``), which keeps every prefix of the stream within
about one sample of the exact proportions. The choice is sequential by nature; megatron-core's compiled helper
makes it (123M samples over 10 datasets in about a second), and an exact Python loop stands in where
megatron-core is not installed.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from functools import cache
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from tqdm import tqdm

from megatron_mobilellm.data.gpt_dataset import normalize
from megatron_mobilellm.data.index_cache import cached_arrays


@cache
def megatron_helpers() -> ModuleType | None:
    """megatron-core's compiled dataset helpers, loaded from the installed wheel without importing
    ``megatron.core`` itself (which takes tens of seconds and initialises unrelated subsystems)."""
    spec = importlib.util.find_spec("megatron")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for path in sorted(Path(root, "core", "datasets").glob("helpers_cpp*.so")):
            loader = importlib.machinery.ExtensionFileLoader("helpers_cpp", str(path))
            module_spec = importlib.util.spec_from_loader("helpers_cpp", loader)
            try:
                module = importlib.util.module_from_spec(module_spec)
                loader.exec_module(module)
            except ImportError:
                continue
            return module
    return None


def blend_assignment_reference(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """The blending rule as a plain loop: exact, about 1 s per million samples."""
    counts = [0] * len(weights)
    dataset_index = np.empty(size, dtype=np.int16)
    sample_index = np.empty(size, dtype=np.int64)
    for i in tqdm(range(size), desc="blend index", unit="sample", unit_scale=True, disable=size < 10**7):
        t = float(max(i, 1))
        best, best_error = 0, weights[0] * t - counts[0]
        for d in range(1, len(weights)):
            error = weights[d] * t - counts[d]
            if error > best_error:
                best, best_error = d, error
        dataset_index[i] = best
        sample_index[i] = counts[best]
        counts[best] += 1
    return dataset_index, sample_index


def blend_assignment(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset of each sample, index of that sample within its dataset) for normalised ``weights``."""
    helpers = megatron_helpers()
    if helpers is None:
        return blend_assignment_reference(weights, size)
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    helpers.build_blending_indices(dataset_index, sample_index, np.asarray(weights, dtype=np.float64),
                                   len(weights), size, False)
    return dataset_index, sample_index


class BlendedDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from ``datasets`` by ``weights``; ``ds[i]`` is a sample of the chosen dataset."""

    def __init__(self, datasets: list[torch.utils.data.Dataset], weights: list[float], size: int,
                 description: dict, cache_dir: str | Path):
        if len(datasets) >= 2**15:
            raise ValueError(f"a blend of {len(datasets)} datasets; at most {2**15 - 1} are supported")
        weights = normalize(weights)
        arrays = cached_arrays(cache_dir, {**description, "weights": weights, "size": size, "kind": "blend"},
                               ["dataset_index", "dataset_sample_index"],
                               lambda: dict(zip(("dataset_index", "dataset_sample_index"),
                                                blend_assignment(weights, size))))
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        counts = np.bincount(self.dataset_index, minlength=len(datasets))
        for d, (n, ds) in enumerate(zip(counts, datasets)):
            if n > len(ds):
                raise ValueError(f"the blend draws {n} samples from dataset {d}, which has {len(ds)}")
        self.datasets, self.size = datasets, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]
