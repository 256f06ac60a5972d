#!/usr/bin/env python
"""Compare the loss curves of two runs (e.g. the fast path vs the plain eager path, or a refactor vs before it).

    python tools/compare_losses.py runs/fast/tb runs/eager/tb
    python tools/compare_losses.py before.json after.json --exact    # exit 1 unless bit-identical
    python tools/compare_losses.py zero2/tb zero3/tb --tag train/loss --tag train/grad_norm --rtol 1e-5

Each side is a TensorBoard log directory (its ``--tag`` curves, ``train/loss`` by default) or a JSON file of
``{step: loss}``, possibly nested by run name (``{"zero1": {"train": {"1": 6.24, ...}}}``); curves are paired by
name. ``--exact`` asks for the same steps and the same float values, bit for bit; ``--rtol`` for every common
step to agree to that relative difference (round-off, e.g. between ZeRO stages in fp32).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_mobilellm.errors import ArgumentParser

Curve = dict[int, float]


def _flatten(tree: dict, prefix: str = "") -> dict[str, Curve]:
    if all(not isinstance(v, dict) for v in tree.values()):
        return {prefix: {int(step): float(loss) for step, loss in tree.items()}}
    out = {}
    for key, sub in tree.items():
        out.update(_flatten(sub, f"{prefix}/{key}" if prefix else key))
    return out


def curves(source: str, tags: list[str]) -> dict[str, Curve]:
    """Named curves of a TensorBoard directory (named by tag when there are several) or a JSON file."""
    if Path(source).is_file():
        return _flatten(json.loads(Path(source).read_text()))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(source, size_guidance={"scalars": 0})
    acc.Reload()
    return {(tag if len(tags) > 1 else ""): {e.step: e.value for e in acc.Scalars(tag)} for tag in tags}


def compare(name: str, a: Curve, b: Curve) -> tuple[bool, float]:
    """Print how far apart two curves are; returns whether they hold the same steps with identical values, and
    their largest relative difference."""
    steps = sorted(set(a) & set(b))
    label = f"{name}: " if name else ""
    if not steps:
        print(f"{label}no iteration in common")
        return False, float("inf")
    diffs = [abs(a[s] - b[s]) for s in steps]
    worst = max(range(len(steps)), key=diffs.__getitem__)
    rel = max(d / abs(a[s]) if a[s] else (0.0 if d == 0 else float("inf")) for d, s in zip(diffs, steps))
    print(f"{label}{len(steps)} common iterations; {a[steps[0]]:.4f} → {a[steps[-1]]:.4f} (a), "
          f"{b[steps[0]]:.4f} → {b[steps[-1]]:.4f} (b)")
    print(f"{label}max |Δ| {diffs[worst]!r} at iteration {steps[worst]}; mean |Δ| {sum(diffs) / len(diffs):.4g}; "
          f"last-10 mean |Δ| {sum(diffs[-10:]) / len(diffs[-10:]):.4g}; max relative Δ {rel:.3g}")
    identical = a.keys() == b.keys() and all(a[s] == b[s] for s in steps)
    print(f"{label}{'bit-identical' if identical else 'NOT identical'}"
          + ("" if a.keys() == b.keys() else f" (steps only in a: {sorted(a.keys() - b.keys())}, "
                                               f"only in b: {sorted(b.keys() - a.keys())})"))
    return identical, rel


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--tag", action="append", help="a TensorBoard scalar to compare, repeatable (default train/loss)")
    p.add_argument("--exact", action="store_true", help="exit 1 unless every curve is bit-identical")
    p.add_argument("--rtol", type=float, default=None, help="exit 1 if any step differs by more than this, relative")
    args = p.parse_args(argv)
    tags = args.tag or ["train/loss"]
    a, b = curves(args.a, tags), curves(args.b, tags)
    names = sorted(a.keys() & b.keys())
    if not names:
        print(f"error: no curve in common (a has {sorted(a)}, b has {sorted(b)})", file=sys.stderr)
        return 1
    results = [compare(name, a[name], b[name]) for name in names]
    if args.exact and not all(identical for identical, _ in results):
        return 1
    worst = max(rel for _, rel in results)
    if args.rtol is not None and worst > args.rtol:
        print(f"error: the runs differ by {worst:.3g} relative, above --rtol {args.rtol:g} ({args.b})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
