#!/usr/bin/env python
"""Evaluate an exported model offline: the paper's zero-shot table (lm-eval-harness) or perplexity.

    python tools/evaluate.py --hf runs/125M/hf --data-dir eval_data/ --output results.json
    python tools/evaluate.py --checkpoint runs/125M/ckpt --tokenizer-model tokenizer.model --data-dir eval_data/
    python tools/evaluate.py --hf runs/125M/hf --text wikitext2_test.txt --seq-length 2048
    python tools/evaluate.py --hf runs/125M/hf --data-path data/valid_text_document

Zero-shot tasks read ``--data-dir/<task>.jsonl`` (or ``.parquet``) in the task's Hub schema; without --data-dir,
lm-eval's Hub datasets. The model is only ever read from local files.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from megatron_mobilellm.atomic import atomic_file
from megatron_mobilellm.errors import ArgumentParser, EvaluationError, cli_main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from megatron_mobilellm.evaluation.zero_shot import DEFAULT_TASKS

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--hf", help="Hugging Face export (Llama or MobileLLM format) with its tokenizer")
    model.add_argument("--checkpoint", help="a training run's --save directory, exported (latest) to a temp dir")
    p.add_argument("--tokenizer-model", help="--checkpoint: the SentencePiece model to export with it")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help="comma-separated lm-eval tasks (default: the paper's eight)")
    p.add_argument("--data-dir", help="one file per task, NAME.jsonl or NAME.parquet (default: the Hub)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--text", help="perplexity of this UTF-8 text file instead of the zero-shot tasks")
    source.add_argument("--data-path", help="perplexity of this .bin/.idx dataset prefix instead")
    p.add_argument("--seq-length", type=int, default=None,
                   help="perplexity window in tokens (default: the model's context, 2048 for the presets)")
    p.add_argument("--limit", type=int, default=None, help="at most N rows per task (N windows for perplexity)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="weights' dtype for evaluation (auto: as exported)")
    p.add_argument("--output", help="write the results as JSON here")
    args = p.parse_args(argv)
    for flag in ("limit", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be positive")
    return args


def check_paths(args: argparse.Namespace) -> None:
    """Inputs that can be checked before anything heavy is imported or exported."""
    for flag, path, kind in (("--hf", args.hf, "dir"), ("--checkpoint", args.checkpoint, "dir"),
                             ("--data-dir", args.data_dir, "dir"), ("--text", args.text, "file"),
                             ("--tokenizer-model", args.tokenizer_model, "file")):
        if path is not None and not (Path(path).is_dir() if kind == "dir" else Path(path).is_file()):
            raise EvaluationError(f"no such {'directory' if kind == 'dir' else 'file'} ({path})")
    if args.output is not None and not Path(args.output).resolve().parent.is_dir():
        raise EvaluationError(f"the output's directory does not exist ({args.output})")


def perplexity_summary(args: argparse.Namespace, model, tokenizer) -> dict:
    from megatron_mobilellm.evaluation import perplexity

    seq_length = perplexity.check_seq_length(model, args.seq_length)
    source = args.text or args.data_path
    measure = perplexity.text_perplexity if args.text is not None else perplexity.dataset_perplexity
    result = measure(model, tokenizer, source, seq_length, args.batch_size, args.limit)
    print(perplexity.format_result(result, source))
    return {"model": args.hf or args.checkpoint, "source": source, **result.to_dict()}


def zero_shot_summary(args: argparse.Namespace, model, tokenizer, specs: list, tasks: list) -> dict:
    from megatron_mobilellm.evaluation import hf_model, zero_shot
    from megatron_mobilellm.evaluation.reference import reference_row

    results = zero_shot.evaluate(model, tokenizer, specs, tasks, args.batch_size, args.limit)
    reference = reference_row(hf_model.architecture(model))
    version = zero_shot.lm_eval_version()
    print(f"\nzero-shot, lm-eval {version}, {'data from ' + args.data_dir if args.data_dir else 'Hub datasets'}"
          f"{f', at most {args.limit} rows per task' if args.limit else ''} (accuracy, %)\n")
    print(zero_shot.format_table(results, args.hf or args.checkpoint, reference))
    return {"model": args.hf or args.checkpoint, "lm_eval_version": version, "data_dir": args.data_dir,
            "limit": args.limit, "reference": reference, **zero_shot.results_dict(results, reference)}


def run(args: argparse.Namespace, scratch: Path) -> dict:
    """Check the cheap inputs first (export, task files), then export a checkpoint, load the model, evaluate."""
    import torch

    from megatron_mobilellm.evaluation import hf_model, zero_shot

    hf_dir = hf_model.llama_dir(args.hf, scratch) if args.hf is not None else None
    zero_shot_mode = args.text is None and args.data_path is None
    if zero_shot_mode:
        specs = zero_shot.resolve_tasks([t.strip() for t in args.tasks.split(",") if t.strip()])
        tasks = zero_shot.load_tasks(specs, Path(args.data_dir) if args.data_dir else None, scratch, args.limit)
    if hf_dir is None:
        hf_dir = hf_model.llama_dir(
            hf_model.export_checkpoint(args.checkpoint, args.tokenizer_model, scratch / "export"), scratch)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = hf_model.load(hf_dir, device, args.dtype)
    if zero_shot_mode:
        return zero_shot_summary(args, model, tokenizer, specs, tasks)
    return perplexity_summary(args, model, tokenizer)


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_paths(args)
    with tempfile.TemporaryDirectory(prefix="mobilellm-eval-") as scratch:
        summary = run(args, Path(scratch))
    if args.output is not None:
        with atomic_file(args.output) as f:
            json.dump(summary, f, indent=2)
        print(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
