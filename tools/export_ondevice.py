#!/usr/bin/env python
"""Export a training checkpoint or a Hugging Face export for on-device inference: a llama.cpp GGUF file.

    python tools/export_ondevice.py --checkpoint runs/quickstart/checkpoints \\
        --tokenizer-model runs/quickstart/data/tokenizer.model --outtype q8_0 --output mobilellm-q8_0.gguf --verify
    python tools/export_ondevice.py --hf runs/quickstart/hf --outtype f16 --output mobilellm-f16.gguf --verify

f32, f16 and q8_0 are written by our writer (the ``gguf`` library); q4_0, q4_1, q5_0, q5_1, q4_k_m, q5_k_m and
q6_k by llama.cpp's own quantizer (``pip install llama-cpp-python``, also needed for --verify). --verify runs the
file in llama.cpp and compares greedy continuations and logits with our model on the original weights; f32, f16
and q8_0 must stay within a tolerance, the 4- to 6-bit types are reported only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_mobilellm.checkpoint_layout import read_checkpoint
from megatron_mobilellm.convert.hf_format import ExportError, read_hf
from megatron_mobilellm.errors import ArgumentParser

FORMATS = ("gguf",)
TOLERANCES = {"f32": 1e-2, "f16": 3e-2, "q8_0": 0.5}
"""Default --verify bounds on max |Δlogits| (llama.cpp keeps its KV cache in f16, hence not 1e-4 at f32)."""


def _load(args: argparse.Namespace):
    """Weights, config and tokenizer path of the model to export."""
    if args.checkpoint:
        if not args.tokenizer_model:
            raise ExportError("a GGUF carries its tokenizer: --checkpoint needs --tokenizer-model (--tokenizer-model)")
        _, cfg, state = read_checkpoint(args.checkpoint, args.tag, args.iteration)
        return state, cfg, args.tokenizer_model
    state, cfg = read_hf(args.hf)
    if args.tokenizer_model:
        return state, cfg, args.tokenizer_model
    if not (Path(args.hf) / "tokenizer.model").is_file():
        raise ExportError(f"no SentencePiece tokenizer.model in {args.hf}; pass --tokenizer-model (--hf)")
    return state, cfg, Path(args.hf) / "tokenizer.model"


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="the --save directory of a training run")
    src.add_argument("--hf", help="a Hugging Face export (Llama or MobileLLM format)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--iteration", type=int, default=None, help="--checkpoint: export iter_N instead of latest")
    which.add_argument("--tag", default=None, help="--checkpoint: export this tag instead of latest")
    p.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece model to embed (default for --hf: its tokenizer.model)")
    p.add_argument("--format", default="gguf", help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--outtype", default="f16", help="f32, f16, q8_0, or one of llama.cpp's quantizations "
                   "(q4_0, q4_1, q5_0, q5_1, q4_k_m, q5_k_m, q6_k)")
    p.add_argument("--output", required=True, help="file to write")
    p.add_argument("--name", default=None, help="model name stored in the file (default: the output's stem)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--verify", action="store_true", help="run the file in llama.cpp and compare with our model")
    p.add_argument("--prompt", action="append", default=None, help="--verify prompt (repeatable; default: 4)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="--verify: greedy tokens per prompt")
    p.add_argument("--tolerance", type=float, default=None,
                   help=f"--verify: max |Δlogits| allowed (default {TOLERANCES}; other outtypes: report only)")
    args = p.parse_args(argv)
    try:
        try:  # the writer needs the ondevice extra; --help and argument errors do not
            from megatron_mobilellm.convert.gguf_format import check_output, read_vocabulary, write_gguf
        except ModuleNotFoundError as e:
            raise ExportError(f"GGUF export needs the {e.name} package: pip install -e '.[ondevice]' "
                              "(--format gguf)") from None
        if args.format not in FORMATS:
            raise ExportError(f"format {args.format!r} is not supported; choose one of {', '.join(FORMATS)} "
                              f"(--format)")
        check_output(args.output, args.outtype, args.overwrite)
        state, cfg, tokenizer = _load(args)
        vocab = read_vocabulary(tokenizer, cfg.vocab_size)
        out = write_gguf(state, cfg, vocab, args.output, args.outtype, args.name, args.overwrite)
    except (ValueError, OSError) as e:  # ExportError and CheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 1
    params = sum(v.numel() for v in state.values())
    print(f"exported {args.checkpoint or args.hf} ({params:,} parameters, {cfg.num_passes} layers, "
          f"{'tied embedding stored once' if cfg.tie_embeddings else 'untied output'}) → {out} "
          f"[{args.outtype}, {out.stat().st_size / 2**20:.2f} MiB]")
    if args.verify:
        return _verify(args, out, state, cfg, tokenizer)
    return 0


def _verify(args: argparse.Namespace, out: Path, state, cfg, tokenizer) -> int:
    from megatron_mobilellm.convert.verify import DEFAULT_PROMPTS, llama_cpp_agreement

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("error: --verify runs the file in llama.cpp: pip install llama-cpp-python (--verify)", file=sys.stderr)
        return 1
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    results = llama_cpp_agreement(out, state, cfg, tokenizer, prompts, args.max_new_tokens)
    for r in results:
        print(f"verify: {r.prompt!r}: {r.agreed}/{r.generated} greedy tokens agree, "
              f"max |Δlogits| {r.max_logit_diff:.2e}{'' if r.same_tokenization else ', TOKENIZED DIFFERENTLY'}")
    agreed, total = sum(r.agreed for r in results), sum(r.generated for r in results)
    diff = max(r.max_logit_diff for r in results)
    same_tok = sum(r.same_tokenization for r in results)
    tolerance = args.tolerance if args.tolerance is not None else TOLERANCES.get(args.outtype)
    bound = f"tolerance {tolerance:.0e}" if tolerance is not None else "no tolerance for this outtype"
    print(f"verify: llama.cpp vs ours [{args.outtype}]: {agreed}/{total} greedy tokens agree, tokenizer "
          f"{same_tok}/{len(results)} prompts identical, max |Δlogits| = {diff:.3e} ({bound})")
    if same_tok < len(results):
        print(f"error: llama.cpp tokenizes {len(results) - same_tok} prompt(s) differently from the SentencePiece "
              f"model ({tokenizer})", file=sys.stderr)
        return 1
    if tolerance is not None and not diff <= tolerance:
        print(f"error: the GGUF does not compute the same function: max |Δlogits| {diff:.3e} > {tolerance:.0e} "
              f"({out})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
