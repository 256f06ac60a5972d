"""Build-once, load-everywhere cache for dataset index arrays (``.npy`` files keyed by a hash).

Rank 0 builds missing arrays while the other ranks wait at a barrier and then load them — no rank spins waiting
on a file and times out. Where the cache directory is not shared between nodes, a rank that still finds nothing
after the barrier builds its own copy (the build is deterministic, so every copy is identical).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch.distributed as dist

from megatron_mobilellm.atomic import atomic_file


def default_cache_dir(prefix: str | Path) -> Path:
    """Where index arrays go without ``--data-cache-path``: beside the dataset, one folder per prefix."""
    return Path(f"{prefix}_cache")


def description_hash(description: dict) -> str:
    return hashlib.md5(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _paths(cache_dir: Path, key: str, names: list[str]) -> dict[str, Path]:
    return {n: cache_dir / f"{key}-{n}.npy" for n in names}


def _build_and_save(cache_dir: Path, key: str, description: dict, build: Callable[[], dict[str, np.ndarray]],
                    paths: dict[str, Path]) -> dict[str, np.ndarray]:
    arrays = build()
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / f"{key}-description.json").write_text(json.dumps(description, indent=2, sort_keys=True))
    for name, arr in arrays.items():
        with atomic_file(paths[name], "wb") as f:
            np.save(f, arr, allow_pickle=False)
    return arrays


def cached_arrays(cache_dir: str | Path, description: dict, names: list[str],
                  build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays ``names`` for ``description``, memory-mapped from the cache, built by ``build`` if missing."""
    cache_dir = Path(cache_dir)
    key = description_hash(description)
    paths = _paths(cache_dir, key, names)
    exists = lambda: all(p.is_file() for p in paths.values())  # noqa: E731
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        if not exists():
            _build_and_save(cache_dir, key, description, build, paths)
    if distributed:
        dist.barrier()
        if not exists():  # a node-local cache directory on another node
            _build_and_save(cache_dir, key, description, build, paths)
    return {n: np.load(p, mmap_mode="r", allow_pickle=False) for n, p in paths.items()}
