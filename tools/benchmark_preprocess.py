#!/usr/bin/env python
"""Preprocessing and index-building speed (a benchmark, not a test). Prints a table and JSON.

    python tools/benchmark_preprocess.py [--mb 100] [--repeats 3] [--documents 10000000]

Compares, on the same generated amber-style input (2049-token rows, json.dumps formatting, an extra key):
a naive converter (``json.loads`` + ``np.array`` + the same writer) against ``preprocess`` with 1 and 2 workers,
each the best of ``--repeats`` runs (on a shared machine the best run is the one least disturbed); then times
building the GPT sample index over ``--documents`` documents.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from megatron_mobilellm.data.gpt_dataset import build_document_index, build_sample_index
from megatron_mobilellm.data.indexed_dataset import IndexedDatasetWriter
from megatron_mobilellm.data.preprocess import Options, preprocess
from megatron_mobilellm.errors import ArgumentParser


def make_input(path: Path, mb: float) -> int:
    rng = np.random.default_rng(0)
    size = 0
    with open(path, "w") as f:
        while size < mb * 1e6:
            line = json.dumps({"token_ids": rng.integers(0, 32000, 2049).tolist(), "source": "web"}) + "\n"
            f.write(line)
            size += len(line)
    return size


def naive(path: Path, prefix: Path) -> None:
    with open(path) as f, IndexedDatasetWriter(prefix, np.uint16) as w:
        for line in f:
            w.add_document(np.array(json.loads(line)["token_ids"]))


def best_mb_s(runs: dict[str, Callable[[], None]], size: int, repeats: int) -> dict[str, float]:
    """MB/s of each run's fastest repeat; the runs take turns, so a burst of load on a shared machine hits all."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t)
    return {name: size / 1e6 / t for name, t in best.items()}


def main() -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=100.0, help="size of the generated input")
    p.add_argument("--repeats", type=int, default=3, help="runs per converter; the fastest counts")
    p.add_argument("--documents", type=int, default=10_000_000, help="documents for the index-build timing")
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "in.jsonl"
        size = make_input(src, args.mb)
        runs = {"naive_mb_s": lambda: naive(src, tmp / "naive")}
        for workers in (1, 2):
            runs[f"workers{workers}_mb_s"] = partial(preprocess, [str(src)], str(tmp / f"w{workers}"), Options(),
                                                     workers=workers, progress=False)
        results.update(best_mb_s(runs, size, args.repeats))
        assert (tmp / "naive.bin").read_bytes() == (tmp / "w1.bin").read_bytes() == (tmp / "w2.bin").read_bytes()
    rng = np.random.RandomState(0)  # Megatron's generator, as the trainer's index build uses
    lengths = rng.randint(1, 2000, size=args.documents).astype(np.int32)
    t = time.perf_counter()
    doc_index = build_document_index(np.arange(args.documents), 1, rng)
    num_samples = (int(lengths.sum()) - 1) // 2048
    build_sample_index(lengths, doc_index, 2048, num_samples)
    rng.permutation(num_samples)
    results["index_build_s"] = time.perf_counter() - t
    results["index_documents"] = args.documents
    results["input_mb"] = size / 1e6
    print(f"{'converter':<28}{'MB/s':>10}{'vs naive':>10}")
    for key, name in [("naive_mb_s", "naive (json + np.array)"), ("workers1_mb_s", "preprocess, 1 worker"),
                      ("workers2_mb_s", "preprocess, 2 workers")]:
        print(f"{name:<28}{results[key]:>10.1f}{results[key] / results['naive_mb_s']:>9.2f}x")
    print(f"index build for {args.documents:,} documents: {results['index_build_s']:.2f} s")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
