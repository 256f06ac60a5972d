#!/usr/bin/env python
"""Compare the curves of two runs' TensorBoard logs (e.g. the fast path vs the plain eager path, ZeRO-2 vs ZeRO-3).

    python tools/compare_losses.py runs/fast/tb runs/eager/tb
    python tools/compare_losses.py runs/zero2/tb runs/zero3/tb --tag train/loss --tag train/grad_norm --rtol 1e-5

With ``--rtol`` it exits 1 unless every common iteration of every tag agrees to that relative difference.
"""

from __future__ import annotations

import argparse
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalars(tb_dir: str, tag: str) -> dict[int, float]:
    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def compare(a: dict[int, float], b: dict[int, float], tag: str) -> float:
    """Print how the two curves of ``tag`` differ; returns the largest relative difference."""
    steps = sorted(set(a) & set(b))
    diffs = [abs(a[s] - b[s]) for s in steps]
    rel = max(d / max(abs(a[s]), 1e-30) for d, s in zip(diffs, steps))
    worst = max(range(len(steps)), key=diffs.__getitem__)
    print(f"{tag}: {len(steps)} common iterations; {a[steps[0]]:.4f} → {a[steps[-1]]:.4f} (a), "
          f"{b[steps[0]]:.4f} → {b[steps[-1]]:.4f} (b)")
    print(f"max |Δ| {diffs[worst]:.4g} at iteration {steps[worst]}; mean |Δ| {sum(diffs) / len(diffs):.4g}; "
          f"last-10 mean |Δ| {sum(diffs[-10:]) / len(diffs[-10:]):.4g}; max relative Δ {rel:.3g}")
    return rel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--tag", action="append", help="scalar to compare, repeatable (default: train/loss)")
    p.add_argument("--rtol", type=float, default=None, help="fail (exit 1) above this relative difference")
    args = p.parse_args()
    worst = max(compare(scalars(args.a, tag), scalars(args.b, tag), tag) for tag in args.tag or ["train/loss"])
    if args.rtol is not None and worst > args.rtol:
        print(f"error: the runs differ by {worst:.3g} relative, above --rtol {args.rtol:g} ({args.b})",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
