#!/usr/bin/env python
"""Convert jsonl shards (``{"token_ids": [...]}`` or raw text) into one Megatron ``.bin/.idx`` dataset.

    python tools/preprocess_jsonl.py --input basepath/ --output-prefix data/train --workers 8 --vocab-size 32000
    python tools/preprocess_jsonl.py --input 'raw/*.jsonl' --output-prefix data/text \\
        --tokenizer-model tokenizer.model --json-key text --append-eos
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
from typing import Callable

from megatron_mobilellm.data.indexed_dataset import DatasetWriteError, dataset_stamp
from megatron_mobilellm.data.preprocess import Options, PreprocessError, preprocess
from megatron_mobilellm.errors import ArgumentParser

MAX_WORKERS = 1024
MAX_VOCAB = 2**31 - 1  # ids are stored as int32 above 65,500
MAX_CHUNK_MB = 1024.0  # memory is about chunk size × workers × 2


def bounded(kind: type, low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a finite ``kind`` in ``[low, high]``, checked before any work starts."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"{text} is outside [{low}, {high}]")
        return value
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="files, directories (every *.jsonl[.gz|.zst] below, symlinked folders included, sorted by "
                        "path) or globs; .zst needs the [zstd] extra")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--json-key", default=None, help="key of each line to read (token_ids, or text with a tokenizer)")
    p.add_argument("--vocab-size", type=bounded(int, 1, MAX_VOCAB), default=None,
                   help="bounds-checks ids and picks the token dtype (default 32000, or the tokenizer's)")
    p.add_argument("--tokenizer-model", default=None, help="SentencePiece model: tokenize raw text")
    p.add_argument("--append-eos", action="store_true", help="end every document with the tokenizer's EOS")
    p.add_argument("--prepend-bos", action="store_true", help="start every document with the tokenizer's BOS")
    p.add_argument("--workers", type=bounded(int, 1, MAX_WORKERS), default=1,
                   help="parser processes (output is identical for any N)")
    p.add_argument("--chunk-size-mb", type=bounded(float, 1e-3, MAX_CHUNK_MB), default=4.0,
                   help="lines are dispatched in chunks of this size")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip and count malformed lines instead of stopping at the first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if (args.append_eos or args.prepend_bos) and not args.tokenizer_model:
        p.error("--append-eos/--prepend-bos need --tokenizer-model (token_ids lines are taken as they are)")
    if args.tokenizer_model and args.vocab_size:
        p.error("--vocab-size comes from --tokenizer-model; give one or the other")
    args.json_key = args.json_key or ("text" if args.tokenizer_model else "token_ids")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = Options(json_key=args.json_key, vocab_size=args.vocab_size or 32000,
                   tokenizer_model=args.tokenizer_model, append_eos=args.append_eos,
                   prepend_bos=args.prepend_bos, skip_bad_lines=args.skip_bad_lines)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a scheduler's stop cleans up like Ctrl-C
    stamp = dataset_stamp(args.output_prefix)
    try:
        summary = preprocess(args.input, args.output_prefix, opts, workers=args.workers,
                             chunk_bytes=int(args.chunk_size_mb * (1 << 20)), progress=not args.no_progress)
    except (PreprocessError, DatasetWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        done = "nothing written" if dataset_stamp(args.output_prefix) == stamp else "already written in full"
        print(f"error: interrupted; {done} ({args.output_prefix})", file=sys.stderr)
        return 130
    print(summary.report())
    print(f"wrote {args.output_prefix}.bin and {args.output_prefix}.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
