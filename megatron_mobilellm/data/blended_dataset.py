"""Deterministic mixing of several datasets by weight (``--data-path 0.7 A 0.3 B``), as megatron-core blends.

Sample ``i`` goes to the dataset furthest behind its target share, ``argmax_d(w_d·max(i, 1) − count_d)`` with ties
to the lower index (megatron-core's ``build_blending_indices``), which keeps every prefix of the stream within
about one sample of the exact proportions. The choice is sequential by nature; megatron-core's compiled helper
makes it where megatron-core is installed, an exact block-parallel numpy version elsewhere.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from functools import cache
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

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


def _first_argmax(values: np.ndarray, best: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Row of the maximum in each column of ``values`` ``[K, B]``, the first on ties (numpy's own argmax along
    axis 0 is several times slower for few rows)."""
    best[:] = values[0]
    out[:] = 0
    for k in range(1, len(values)):
        out[values[k] > best] = k
        np.maximum(best, values[k], out=best)
    return out


def blend_assignment_numpy(weights: list[float], size: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """The blending rule in numpy, exactly: the stream is cut into blocks of ``block`` samples that run side by side
    from estimated starting counts; each block is then rerun from its predecessor's end until its trajectory meets
    the first run's (within a few dozen samples, as the rule pulls every count towards its share), and again where
    a rerun changed a block's end, until every block starts where the one before ended."""
    if size == 0:
        return np.zeros(0, dtype=np.int16), np.zeros(0, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64)[:, None]
    k = len(w)
    length = min(block, size)
    num_blocks = -(-size // length)
    dataset_index = np.empty((length, num_blocks), dtype=np.int16)  # [sample within block, block]
    sample_index = np.empty((length, num_blocks), dtype=np.int64)
    block_start = np.arange(num_blocks, dtype=np.int64) * length
    share = w * block_start  # estimated counts: floors of the shares, the rest to the largest fractions
    start = np.floor(share)
    rank = np.argsort(np.argsort(start - share, axis=0, kind="stable"), axis=0, kind="stable")
    start += rank < (block_start - start.sum(0))
    start[:, 0] = 0

    def run(blocks: np.ndarray, counts: np.ndarray, before: np.ndarray | None = None):
        """Run ``blocks`` from ``counts`` ``[K, len(blocks)]``; with the counts of the earlier run (``before``), stop
        each block where both agree. Returns the blocks that ran to their end and their final counts."""
        values, best, choice = np.empty_like(counts), np.empty(len(blocks)), np.empty(len(blocks), dtype=np.intp)
        for j in range(length):
            if not len(blocks):
                break
            cols = np.arange(len(blocks))
            t = np.maximum(block_start[blocks] + j, 1).astype(np.float64)
            np.subtract(np.multiply(w, t, out=values), counts, out=values)  # w_d·max(i, 1) − count_d
            d = _first_argmax(values, best, choice)
            if before is not None:
                before[dataset_index[j, blocks], cols] += 1
            flat = d * len(blocks) + cols
            dataset_index[j, blocks] = d
            sample_index[j, blocks] = counts.reshape(-1)[flat]
            counts.reshape(-1)[flat] += 1
            if before is not None:
                going = (counts != before).any(0)
                if not going.all():
                    # C order kept: the flat view above must alias the counts
                    blocks, counts, before = blocks[going], np.ascontiguousarray(counts[:, going]), before[:, going]
                    values, best, choice = np.empty_like(counts), best[going], choice[going]
        return blocks, counts

    _, end = run(np.arange(num_blocks), start.copy())
    while True:
        true_start = np.concatenate([np.zeros((k, 1)), end[:, :-1]], axis=1)
        wrong = np.flatnonzero((true_start != start).any(0))
        if not wrong.size:
            break
        finished, counts = run(wrong, true_start[:, wrong].copy(), start[:, wrong].copy())
        end[:, finished] = counts
        start[:, wrong] = true_start[:, wrong]
    return dataset_index.T.reshape(-1)[:size], sample_index.T.reshape(-1)[:size]


def blend_assignment(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset of each sample, index of that sample within its dataset); ``weights`` are normalised here, as
    megatron-core's BlendedDataset normalises what it is given (the choices depend on the exact floats)."""
    weights = normalize(weights)
    helpers = megatron_helpers()
    if helpers is None:
        return blend_assignment_numpy(weights, size)
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
