#!/usr/bin/env python
"""Generate text from a training checkpoint (our model) or a Hugging Face export (transformers).

    python tools/generate.py --checkpoint runs/tiny/ckpt --tokenizer-model tok.model --prompt "The module"
    python tools/generate.py --hf hf/tiny --prompt "The module" --temperature 0.8 --top-p 0.9
"""

from __future__ import annotations

import argparse
import sys

import torch

from megatron_mobilellm.checkpoint_layout import read_checkpoint
from megatron_mobilellm.errors import CheckpointError
from megatron_mobilellm.generation import generate
from megatron_mobilellm.model import MobileLLM


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a training --save directory (latest tag)")
    src.add_argument("--hf", help="a Hugging Face export")
    p.add_argument("--tokenizer-model", help="SentencePiece model (for --checkpoint; --hf uses its own tokenizer)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-ids", help="prompt as space-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.prompt is not None and args.checkpoint and not args.tokenizer_model:
        p.error("--prompt with --checkpoint needs --tokenizer-model (or use --prompt-ids)")
    if args.hf:
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(args.hf) if args.prompt is not None else None
        ids = tok(args.prompt)["input_ids"] if tok else [int(t) for t in args.prompt_ids.split()]
        model = transformers.AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32)
        sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.temperature > 0 \
            else dict(do_sample=False)
        torch.manual_seed(args.seed)
        out = model.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens, **sampling)[0].tolist()
        text = tok.decode(out, skip_special_tokens=True) if tok else None
    else:
        try:
            _, cfg, state = read_checkpoint(args.checkpoint)
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        model = MobileLLM(cfg, attention_backend="sdpa")
        model.load_state_dict(state)
        sp = None
        if args.tokenizer_model:
            import sentencepiece

            sp = sentencepiece.SentencePieceProcessor(model_file=args.tokenizer_model)
        ids = [sp.bos_id(), *sp.encode(args.prompt)] if args.prompt is not None else \
            [int(t) for t in args.prompt_ids.split()]
        out = generate(model, ids, args.max_new_tokens, args.temperature, args.top_p,
                       sp.eos_id() if sp else None, args.seed)
        text = sp.decode(out) if sp else None
    print("ids:", " ".join(map(str, out)))
    if text is not None:
        print("text:", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
