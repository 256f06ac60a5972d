#!/usr/bin/env python
"""Merge several ``.bin/.idx`` datasets into one, keeping document boundaries.

    python tools/merge_datasets.py --input data/part1 data/part2 --output-prefix data/all
"""

from __future__ import annotations

import argparse
import signal
import sys

from megatron_mobilellm.data.indexed_dataset import (DatasetFormatError, DatasetWriteError, dataset_stamp,
                                                     merge_datasets)
from megatron_mobilellm.errors import ArgumentParser


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes, in output order")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a scheduler's stop cleans up like Ctrl-C
    stamp = dataset_stamp(args.output_prefix)
    try:
        n = merge_datasets(args.input, args.output_prefix, progress=not args.no_progress)
    except (DatasetFormatError, DatasetWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        done = "nothing written" if dataset_stamp(args.output_prefix) == stamp else "already written in full"
        print(f"error: interrupted; {done} ({args.output_prefix})", file=sys.stderr)
        return 130
    print(f"merged {len(args.input)} datasets, {n:,} sequences → {args.output_prefix}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
