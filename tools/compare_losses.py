#!/usr/bin/env python
"""Compare the loss curves of two runs (e.g. the fast path vs the plain eager path, or a refactor vs before it).

    python tools/compare_losses.py runs/fast/tb runs/eager/tb
    python tools/compare_losses.py before.json after.json --exact    # exit 1 unless bit-identical

Each side is a TensorBoard log directory (its ``--tag`` curve, ``train/loss`` by default) or a JSON file of
``{step: loss}``, possibly nested by run name (``{"zero1": {"train": {"1": 6.24, ...}}}``); curves are paired by
name. ``--exact`` asks for the same steps and the same float values, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

Curve = dict[int, float]


def _flatten(tree: dict, prefix: str = "") -> dict[str, Curve]:
    if all(not isinstance(v, dict) for v in tree.values()):
        return {prefix: {int(step): float(loss) for step, loss in tree.items()}}
    out = {}
    for key, sub in tree.items():
        out.update(_flatten(sub, f"{prefix}/{key}" if prefix else key))
    return out


def curves(source: str, tag: str) -> dict[str, Curve]:
    """Named loss curves of a TensorBoard directory or a JSON file."""
    if Path(source).is_file():
        return _flatten(json.loads(Path(source).read_text()))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(source, size_guidance={"scalars": 0})
    acc.Reload()
    return {"": {e.step: e.value for e in acc.Scalars(tag)}}


def compare(name: str, a: Curve, b: Curve) -> bool:
    """Print how far apart two curves are; True when they hold the same steps with identical values."""
    steps = sorted(set(a) & set(b))
    label = f"{name}: " if name else ""
    if not steps:
        print(f"{label}no iteration in common")
        return False
    diffs = [abs(a[s] - b[s]) for s in steps]
    worst = max(range(len(steps)), key=diffs.__getitem__)
    print(f"{label}{len(steps)} common iterations; loss {a[steps[0]]:.4f} → {a[steps[-1]]:.4f} (a), "
          f"{b[steps[0]]:.4f} → {b[steps[-1]]:.4f} (b)")
    print(f"{label}max |Δ| {diffs[worst]!r} at iteration {steps[worst]}; mean |Δ| {sum(diffs) / len(diffs):.4g}; "
          f"last-10 mean |Δ| {sum(diffs[-10:]) / len(diffs[-10:]):.4g}")
    identical = a.keys() == b.keys() and all(a[s] == b[s] for s in steps)
    print(f"{label}{'bit-identical' if identical else 'NOT identical'}"
          + ("" if a.keys() == b.keys() else f" (steps only in a: {sorted(a.keys() - b.keys())}, "
                                               f"only in b: {sorted(b.keys() - a.keys())})"))
    return identical


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--tag", default="train/loss", help="the TensorBoard scalar to compare")
    p.add_argument("--exact", action="store_true", help="exit 1 unless every curve is bit-identical")
    args = p.parse_args(argv)
    a, b = curves(args.a, args.tag), curves(args.b, args.tag)
    names = sorted(a.keys() & b.keys())
    if not names:
        print(f"error: no curve in common (a has {sorted(a)}, b has {sorted(b)})", file=sys.stderr)
        return 1
    identical = [compare(name, a[name], b[name]) for name in names]
    return 0 if all(identical) or not args.exact else 1


if __name__ == "__main__":
    sys.exit(main())
