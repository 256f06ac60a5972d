#!/usr/bin/env python
"""Import Hugging Face Llama or MobileLLM-format weights as a starting point for training.

    python tools/convert_hf_to_checkpoint.py --hf path/to/MobileLLM-125M --output ckpt/125M-init
    python -m megatron_mobilellm.pretrain --load ckpt/125M-init ...     # starts from these weights at iteration 0

Accepts safetensors or pytorch_model.bin (also the released files without lm_head). ``--layer-sharing`` folds a
Llama export of an LS model (identical layer pairs) back into shared blocks.
"""

from __future__ import annotations

import argparse
import sys

from megatron_mobilellm.checkpoint_layout import write_imported_weights
from megatron_mobilellm.convert.hf_format import read_hf
from megatron_mobilellm.errors import ArgumentParser, cli_main


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="Hugging Face model directory")
    p.add_argument("--output", required=True, help="directory to pass to pretrain --load")
    p.add_argument("--layer-sharing", action="store_true", help="the Llama export came from an LS model")
    args = p.parse_args(argv)
    state, cfg = read_hf(args.hf, args.layer_sharing)
    write_imported_weights(args.output, state, cfg)
    print(f"imported {args.hf} ({sum(v.numel() for v in state.values()):,} parameters, {cfg.num_layers} blocks"
          f"{', layer sharing' if cfg.layer_sharing else ''}) → {args.output}; train with --load {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
