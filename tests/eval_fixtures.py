"""Five-row task files in the Hub schemas lm-eval's tasks read, a tokenizer trained on them, and tiny exports."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_mobilellm.config import get_config
from megatron_mobilellm.convert.hf_format import write_hf
from megatron_mobilellm.model import MobileLLM

ROWS = 5
_COLORS = ["red", "green", "blue", "yellow"]
_THINGS = ["apple", "river", "stone", "cloud", "lamp"]


def _labelled(texts: list[str]) -> dict:
    return {"text": texts, "label": ["A", "B", "C", "D"][:len(texts)]}


def task_rows(gold: list[int]) -> dict[str, list[dict]]:
    """Rows of each of the eight tasks; ``gold[i]`` is the index of row i's correct choice (mod #choices)."""
    rows: dict[str, list[dict]] = {t: [] for t in ("arc_easy", "arc_challenge", "boolq", "piqa", "siqa",
                                                    "hellaswag", "openbookqa", "winogrande")}
    for i, (thing, g) in enumerate(zip(_THINGS, gold)):
        choices = [f"the {c} {thing}" for c in _COLORS]
        for task in ("arc_easy", "arc_challenge"):
            rows[task].append({"id": f"{task}-{i}", "question": f"Which {thing} did the child {task[4:]} see?",
                               "choices": _labelled(choices), "answerKey": "ABCD"[g % 4]})
        rows["boolq"].append({"question": f"is the {thing} {_COLORS[i % 4]}", "idx": i, "label": g % 2,
                              "passage": f"The {thing} in the story is painted {_COLORS[(i + g) % 4]}."})
        rows["piqa"].append({"goal": f"How do you clean a {thing}?", "sol1": f"Wash the {thing} with water.",
                             "sol2": f"Throw the {thing} into fire.", "label": g % 2})
        rows["siqa"].append({"context": f"Alex found a {thing} on the road.", "question": "What will Alex do?",
                             "answerA": f"keep the {thing}", "answerB": f"paint the {thing}",
                             "answerC": f"sell the {thing}", "label": str(g % 3 + 1)})
        rows["hellaswag"].append({"ind": i, "activity_label": f"Holding a {thing}",
                                  "ctx_a": f"A man picks up a {thing}.", "ctx_b": "he",
                                  "ctx": f"A man picks up a {thing}. he",
                                  "endings": [f"puts it in a {c} box." for c in _COLORS],
                                  "source_id": f"fixture-{i}", "split": "val", "split_type": "indomain",
                                  "label": str(g % 4)})
        rows["openbookqa"].append({"id": f"obqa-{i}", "question_stem": f"A {thing} is usually",
                                   "choices": _labelled([f"{c} in color" for c in _COLORS]),
                                   "answerKey": "ABCD"[g % 4]})
        rows["winogrande"].append({"sentence": f"The {thing} fell on the box because _ was too heavy.",
                                   "option1": f"the {thing}", "option2": "the box", "answer": str(g % 2 + 1)})
    return rows


def write_task_files(directory: Path, gold: list[int]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for task, rows in task_rows(gold).items():
        (directory / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def train_tokenizer(directory: Path, text: str) -> Path:
    """A LLaMA-style SentencePiece model (byte fallback, so any text encodes) that fits the tiny preset's vocab."""
    import sentencepiece as spm

    (directory / "corpus.txt").write_text(text)
    spm.SentencePieceTrainer.train(input=str(directory / "corpus.txt"), model_prefix=str(directory / "sp"),
                                   vocab_size=320, model_type="bpe", byte_fallback=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   minloglevel=2, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, num_threads=1)
    return directory / "sp.model"


def tiny_model(seed: int = 0, **overrides) -> MobileLLM:
    cfg = get_config("tiny", **overrides)
    model = MobileLLM(cfg, attention_backend="eager")
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def export(model: MobileLLM, tokenizer_model: Path, out: Path, fmt: str = "llama") -> Path:
    return write_hf(model.state_dict(), model.config, out, dtype="fp32", fmt=fmt, tokenizer_model=str(tokenizer_model))
