#!/usr/bin/env python
"""Quickstart helpers: an English corpus from the Python standard library, a SentencePiece tokenizer, jsonl shards
in the seed's node layout, and (after training) a loss-curve plot and summary.

    python examples/quickstart_data.py corpus --out DIR [--mb 3]
    python examples/quickstart_data.py plot --tensorboard-dir TB --output loss.png

Everything is built from files every Python installation carries — nothing is downloaded.
"""

from __future__ import annotations

import argparse
import ast
import json
import sysconfig
from pathlib import Path


def stdlib_documents(max_bytes: int) -> list[str]:
    """Docstrings and comment blocks of the standard library's modules, in sorted path order (deterministic)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    size = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in ("test", "tests", "idle_test", "site-packages", "lib2to3") for p in rel):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef,
                                                                       ast.AsyncFunctionDef))]
        texts = [ast.get_docstring(n) for n in nodes]
        comment, blocks = [], []
        for line in source.splitlines():
            stripped = line.strip()
            if stripped.startswith("#") and not stripped.startswith("#!"):
                comment.append(stripped.lstrip("#").strip())
            elif comment:
                blocks.append(" ".join(comment))
                comment = []
        for text in texts + blocks:
            if text and len(text) > 40:
                docs.append(text)
                size += len(text.encode())
        if size >= max_bytes:
            break
    return docs


def build_corpus(out: Path, mb: float, vocab_size: int) -> None:
    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    docs = stdlib_documents(int(mb * 1e6))
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(d.replace("\n", " ") for d in docs) + "\n")
    # LLaMA-style tokenizer settings: no normalisation, whitespace kept, byte fallback, digits split — so the
    # Hugging Face export tokenizes exactly like SentencePiece.
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, split_digits=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2, num_threads=2)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    # The seed's layout: basepath/<node>/*.jsonl with {"token_ids": [...]}, one document per line.
    half = len(docs) // 2
    for node, part in ((1, docs[:half]), (2, docs[half:])):
        shard_dir = out / "jsonl" / str(node)
        shard_dir.mkdir(parents=True, exist_ok=True)
        with open(shard_dir / "shard_000.jsonl", "w") as f:
            for d in part:
                f.write(json.dumps({"token_ids": [sp.bos_id(), *sp.encode(d), sp.eos_id()], "source": "stdlib"})
                        + "\n")
    print(f"corpus: {len(docs):,} documents, {corpus.stat().st_size / 1e6:.1f} MB from the standard library; "
          f"tokenizer: {vocab_size} pieces; shards in {out / 'jsonl'}")


def plot(tensorboard_dir: Path, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    acc.Reload()
    train = acc.Scalars("train/loss")
    valid = acc.Scalars("valid/loss")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([e.step for e in train], [e.value for e in train], label="train")
    ax.plot([e.step for e in valid], [e.value for e in valid], "o-", label="validation")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title("MobileLLM quickstart")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    print(f"validation loss: first {valid[0].value:.3f} (iteration {valid[0].step}) → "
          f"last {valid[-1].value:.3f} (iteration {valid[-1].step})")
    print(f"loss curve: {output}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("corpus")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--mb", type=float, default=3.0)
    c.add_argument("--vocab-size", type=int, default=4096)
    g = sub.add_parser("plot")
    g.add_argument("--tensorboard-dir", type=Path, required=True)
    g.add_argument("--output", type=Path, required=True)
    args = p.parse_args()
    if args.cmd == "corpus":
        build_corpus(args.out, args.mb, args.vocab_size)
    else:
        plot(args.tensorboard_dir, args.output)


if __name__ == "__main__":
    main()
