#!/usr/bin/env python
"""Compare the train/loss curves of two runs' TensorBoard logs (e.g. the fast path vs the plain eager path).

    python tools/compare_losses.py runs/fast/tb runs/eager/tb
"""

from __future__ import annotations

import argparse

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def losses(tb_dir: str) -> dict[int, float]:
    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    args = p.parse_args()
    a, b = losses(args.a), losses(args.b)
    steps = sorted(set(a) & set(b))
    diffs = [abs(a[s] - b[s]) for s in steps]
    worst = max(range(len(steps)), key=diffs.__getitem__)
    print(f"{len(steps)} common iterations; loss {a[steps[0]]:.4f} → {a[steps[-1]]:.4f} (a), "
          f"{b[steps[0]]:.4f} → {b[steps[-1]]:.4f} (b)")
    print(f"max |Δ| {diffs[worst]:.4f} at iteration {steps[worst]}; mean |Δ| {sum(diffs) / len(diffs):.4f}; "
          f"last-10 mean |Δ| {sum(diffs[-10:]) / len(diffs[-10:]):.4f}")


if __name__ == "__main__":
    main()
