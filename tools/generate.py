#!/usr/bin/env python
"""Generate text from a training checkpoint (our model) or a Hugging Face export (transformers).

    python tools/generate.py --checkpoint runs/tiny/ckpt --tokenizer-model tok.model --prompt "The module"
    python tools/generate.py --hf hf/tiny --prompt "The module" --temperature 0.8 --top-p 0.9

``--hf`` is always a local folder (never looked up on the Hugging Face Hub).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from megatron_mobilellm.checkpoint_layout import read_checkpoint
from megatron_mobilellm.errors import ArgumentParser, ConfigError, cli_main
from megatron_mobilellm.generation import generate
from megatron_mobilellm.model import MobileLLM

# Files a Hugging Face folder carries when it has a tokenizer (SentencePiece or fast).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def check_sampling(args: argparse.Namespace) -> None:
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"top-p must be in (0, 1] (--top-p {args.top_p})")
    if args.temperature < 0:
        raise ConfigError(f"temperature must be 0 (greedy) or positive (--temperature {args.temperature})")
    if args.max_new_tokens < 1:
        raise ConfigError(f"generate at least one token (--max-new-tokens {args.max_new_tokens})")


def prompt_ids(text: str, vocab_size: int) -> list[int]:
    """``--prompt-ids`` as a list of ids, each a valid row of the embedding."""
    try:
        ids = [int(t) for t in text.split()]
    except ValueError:
        raise ConfigError(f"token ids must be integers separated by spaces (--prompt-ids {text!r})") from None
    if not ids:
        raise ConfigError("no token ids given (--prompt-ids)")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ConfigError(f"token ids {bad} are outside the vocabulary [0, {vocab_size}) (--prompt-ids)")
    return ids


def generate_hf(args: argparse.Namespace) -> tuple[list[int], str | None]:
    import transformers

    hf = Path(args.hf)
    if not (hf / "config.json").is_file():
        raise ConfigError(f"not a Hugging Face model folder (no config.json) (--hf {hf})")
    tok = None
    if args.prompt is not None:
        if not any((hf / name).is_file() for name in TOKENIZER_FILES):
            raise ConfigError(f"the export has no tokenizer ({' or '.join(TOKENIZER_FILES)}); export with "
                              f"--tokenizer-model or pass --prompt-ids (--hf {hf})")
        tok = transformers.AutoTokenizer.from_pretrained(hf, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, local_files_only=True)
    ids = tok(args.prompt)["input_ids"] if tok else prompt_ids(args.prompt_ids, model.config.vocab_size)
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.temperature > 0 \
        else dict(do_sample=False)
    torch.manual_seed(args.seed)
    out = model.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens, **sampling)[0].tolist()
    return out, tok.decode(out, skip_special_tokens=True) if tok else None


def generate_checkpoint(args: argparse.Namespace) -> tuple[list[int], str | None]:
    _, cfg, state = read_checkpoint(args.checkpoint)
    model = MobileLLM(cfg, attention_backend="sdpa")
    model.load_state_dict(state)
    sp = None
    if args.tokenizer_model:
        import sentencepiece

        try:
            sp = sentencepiece.SentencePieceProcessor(model_file=args.tokenizer_model)
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"not a SentencePiece model: {str(e).splitlines()[0]} "
                              f"(--tokenizer-model {args.tokenizer_model})") from None
    ids = [sp.bos_id(), *sp.encode(args.prompt)] if args.prompt is not None else \
        prompt_ids(args.prompt_ids, cfg.vocab_size)
    out = generate(model, ids, args.max_new_tokens, args.temperature, args.top_p,
                   sp.eos_id() if sp else None, args.seed)
    return out, sp.decode(out) if sp else None


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a training --save directory (latest tag)")
    src.add_argument("--hf", help="a Hugging Face export (a local folder)")
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
    check_sampling(args)
    out, text = generate_hf(args) if args.hf else generate_checkpoint(args)
    print("ids:", " ".join(map(str, out)))
    if text is not None:
        print("text:", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
