#!/usr/bin/env python
"""Export a megatron_mobilellm DeepSpeed checkpoint to a Hugging Face directory.

    python tools/convert_checkpoint_to_hf.py --checkpoint runs/125M/checkpoints --output hf/125M \\
        --tokenizer-model tokenizer.model --verify

Reads any ZeRO stage and data-parallel size (consolidated with DeepSpeed's zero_to_fp32, on CPU), the ``latest``
tag unless --iteration/--tag says otherwise. The result loads with AutoModelForCausalLM.from_pretrained(dir).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_mobilellm.checkpoint_layout import read_checkpoint
from megatron_mobilellm.convert.hf_format import DTYPES, FORMATS, ExportError, write_hf
from megatron_mobilellm.errors import ArgumentParser, cli_main


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the --save directory of a training run")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--iteration", type=int, default=None, help="export iter_N instead of latest")
    which.add_argument("--tag", default=None, help="export this tag instead of latest")
    p.add_argument("--output", required=True, help="Hugging Face directory to write")
    p.add_argument("--tokenizer-model", default=None, help="SentencePiece model to ship with the export")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--format", choices=FORMATS, default="llama",
                   help="llama: plain Llama (LS blocks unrolled); mobilellm: compact MobileLLM-style config")
    p.add_argument("--max-shard-size-gb", type=float, default=2.0)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at --output (nothing else)")
    p.add_argument("--use-module-weights", action="store_true",
                   help="export a ZeRO checkpoint whose optimizer files (fp32 masters) are missing from the module's "
                        "own (bf16 under --bf16) weights")
    p.add_argument("--verify", action="store_true", help="compare logits of the export with our model")
    p.add_argument("--tolerance", type=float, default=1e-4, help="--verify: max |Δlogits| allowed")
    args = p.parse_args(argv)
    if args.tokenizer_model and not Path(args.tokenizer_model).is_file():
        raise ExportError(f"no such file (--tokenizer-model {args.tokenizer_model})")
    tag, cfg, state = read_checkpoint(args.checkpoint, args.tag, args.iteration, args.use_module_weights)
    out = write_hf(state, cfg, args.output, args.dtype, args.format, args.tokenizer_model, args.overwrite,
                   int(args.max_shard_size_gb * (1 << 30)), source=args.checkpoint)
    params = sum(v.numel() for v in state.values())
    print(f"exported {args.checkpoint}/{tag} ({params:,} parameters, {cfg.num_passes} layers as seen by "
          f"{args.format}) → {out} [{args.dtype}]")
    if args.verify:
        from megatron_mobilellm.convert.verify import max_logit_difference

        diff = max_logit_difference(out, state, cfg, args.format, DTYPES[args.dtype])
        print(f"verify: max |Δlogits| = {diff:.3e} (tolerance {args.tolerance:.0e})")
        if not diff <= args.tolerance:
            print("error: the export does not compute the same function", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
