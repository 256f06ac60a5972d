#!/usr/bin/env python
"""Write a synthetic ``.bin/.idx`` dataset (random token documents) for benchmarks and smoke runs.

    python tools/synthetic_data.py --output-prefix /tmp/synth --tokens 20000000 --vocab-size 32000
"""

from __future__ import annotations

import argparse

import numpy as np

from megatron_mobilellm.data.indexed_dataset import IndexedDatasetWriter, token_dtype
from megatron_mobilellm.errors import ArgumentParser


def markov_tokens(rng: np.random.Generator, vocab: int, n: int, states: int, successors: int = 64,
                  zipf: float = 1.1) -> np.ndarray:
    """A first-order Markov chain over ``states`` random token ids: each has ``successors`` fixed random
    successors, drawn with Zipfian weights (rank r with weight r^-zipf). A model learns it gradually — which
    tokens occur (ln V → ln states), then the frequent transitions first — so its loss falls smoothly toward the
    chain's conditional entropy, with no plateau whose sudden end amplifies round-off differences."""
    ids = rng.choice(vocab, size=min(states, vocab), replace=False)
    table = ids[rng.integers(0, len(ids), size=(vocab, successors))].ravel().tolist()
    weights = np.arange(1, successors + 1, dtype=np.float64) ** -zipf
    ranks = np.searchsorted(np.cumsum(weights / weights.sum()), rng.random(n), side="right")
    ranks = np.minimum(ranks, successors - 1).tolist()
    out, token = [0] * n, int(ids[0])
    for i, r in enumerate(ranks):
        token = table[token * successors + r]
        out[i] = token
    return np.asarray(out, dtype=np.int64)


def main() -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokens", type=int, default=10_000_000)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--mean-doc-length", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", choices=["random", "progressions", "markov"], default="random",
                   help="random tokens (loss stays at ln V; for speed), learnable arithmetic progressions (loss "
                        "plateaus, then drops suddenly), or a Zipfian Markov chain (loss falls smoothly; for "
                        "comparing loss curves)")
    p.add_argument("--markov-states", type=int, default=4096, help="markov: how many distinct tokens occur")
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(1, 2 * args.mean_doc_length, size=args.tokens // args.mean_doc_length + 1)
    lengths = lengths[:np.searchsorted(np.cumsum(lengths), args.tokens) + 1]
    n = int(lengths.sum())
    if args.kind == "random":
        tokens = rng.integers(0, args.vocab_size, size=n)
    elif args.kind == "markov":
        tokens = markov_tokens(rng, args.vocab_size, n, args.markov_states)
    else:  # each document counts from a random start with a random small step, modulo the vocabulary
        doc = np.repeat(np.arange(len(lengths)), lengths)
        pos = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        starts, steps = rng.integers(0, args.vocab_size, len(lengths)), rng.integers(1, 8, len(lengths))
        tokens = (starts[doc] + pos * steps[doc]) % args.vocab_size
    with IndexedDatasetWriter(args.output_prefix, token_dtype(args.vocab_size)) as w:
        w.add_documents(tokens, lengths)
    print(f"wrote {len(lengths):,} documents, {int(lengths.sum()):,} tokens to {args.output_prefix}.bin/.idx")


if __name__ == "__main__":
    main()
