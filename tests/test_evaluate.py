"""tools/evaluate.py: lm-eval's zero-shot tasks from local files on a tiny export, and perplexity vs transformers."""

import json
import math
import os
import re

import numpy as np
import pytest
import torch

try:
    import lm_eval  # noqa: F401
except ImportError:
    if os.environ.get("CI") == "true":
        raise  # CI installs the eval extra: its absence is a failure there
    pytest.skip("lm-eval is not installed (pip install -e '.[eval]')", allow_module_level=True)

from eval_fixtures import ROWS, export, task_rows, tiny_model, train_tokenizer, write_task_files  # noqa: E402
from helpers import ROOT, make_corpus, read_scalars, run_pretrain, run_tool, tiny_args  # noqa: E402
from megatron_mobilellm import pretrain  # noqa: E402
from megatron_mobilellm.config import get_config  # noqa: E402
from megatron_mobilellm.checkpoint_layout import read_checkpoint  # noqa: E402
from megatron_mobilellm.convert.hf_format import write_hf  # noqa: E402
from megatron_mobilellm.data.indexed_dataset import IndexedDatasetWriter  # noqa: E402
from megatron_mobilellm.errors import EvaluationError  # noqa: E402
from megatron_mobilellm.evaluation import hf_model, perplexity, zero_shot  # noqa: E402
from megatron_mobilellm.evaluation.reference import COLUMNS, PAPER_ROWS, reference_row  # noqa: E402
from megatron_mobilellm.model.loss import IGNORE_INDEX  # noqa: E402

GOLD = [0, 1, 2, 3, 1]
PROSE = ("The river runs past the old stone mill, where children count the clouds and name the colors of every "
         "apple they find. A lamp burns in the window until the evening bell. ")


def evaluate_tool(*args, check=True):
    return run_tool("evaluate.py", *args, check=check, timeout=900)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Task files (correct and shuffled answers), a tokenizer trained on them, and a random tiny LS export."""
    d = tmp_path_factory.mktemp("eval")
    write_task_files(d / "tasks", GOLD)
    write_task_files(d / "shuffled", [g + 1 for g in GOLD])
    text = "\n".join(json.dumps(r) for rows in task_rows(GOLD).values() for r in rows)
    tokenizer = train_tokenizer(d, (text + "\n" + PROSE) * 4)
    export(tiny_model(layer_sharing=True), tokenizer, d / "hf_ls", fmt="mobilellm")
    return d


def test_fixture_run_prints_the_eight_rows_and_average(work, tmp_path):
    res = evaluate_tool("--hf", work / "hf_ls", "--data-dir", work / "tasks", "--output", tmp_path / "r.json",
                        "--batch-size", 16)
    out = json.loads((tmp_path / "r.json").read_text())
    assert list(out["tasks"]) == list(zero_shot.DEFAULT_TASKS)
    header = next(line for line in res.stdout.splitlines() if line.startswith("| model |"))
    assert header == "| model | " + " | ".join(COLUMNS) + " | avg |"  # the paper's column order
    row = next(line for line in res.stdout.splitlines() if line.startswith(f"| {work / 'hf_ls'} |"))
    cells = [float(c) for c in row.strip("|").split("|")[1:]]
    scores = [t["score"] for t in out["tasks"].values()]
    assert len(cells) == 9 and cells == pytest.approx([round(100 * s, 1) for s in scores] + [cells[-1]])
    assert out["average"] == pytest.approx(sum(scores) / 8) and cells[-1] == pytest.approx(100 * out["average"],
                                                                                           abs=0.05)
    for name, t in out["tasks"].items():
        assert t["rows"] == ROWS and 0 <= t["acc"] <= 1 and 0 <= t["acc_norm"] <= 1
        assert t["table_metric"] == ("acc" if name in ("boolq", "winogrande") else "acc_norm")
        assert t["score"] == t[t["table_metric"]]
    assert out["tasks"]["siqa"]["lm_eval_task"] == "social_iqa" and out["reference"] is None
    assert "table uses" in res.stdout and "Running loglikelihood requests" in res.stderr  # detail and progress


def _memorised_model(tasks, tokenizer_path, max_steps=600):
    """A tiny model trained on lm-eval's own context + correct continuation of every row until it recalls the
    continuations. Training sees whole rows; recall is judged on the continuation tokens alone, since a row's
    first tokens cannot be predicted from what precedes them (the whole-row loss levels off near 0.04)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    seqs, contexts = [], []
    for task in tasks:
        for doc in task.eval_docs:
            choices, gold = task.doc_to_choice(doc), task.doc_to_target(doc)
            text = task.doc_to_text(doc) + task.config.target_delimiter + choices[gold]
            seqs.append([sp.bos_id(), *sp.encode(text)])
            contexts.append(1 + len(sp.encode(task.doc_to_text(doc))))
    width = max(map(len, seqs))
    ids = torch.tensor([s + [IGNORE_INDEX] * (width - len(s)) for s in seqs])
    continuations = ids.clone()
    for row, n in zip(continuations, contexts):
        row[:n] = IGNORE_INDEX
    model = tiny_model(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(1, max_steps + 1):
        loss = model(ids[:, :-1].clamp(min=0), labels=ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            with torch.no_grad():
                recall = model(ids[:, :-1].clamp(min=0), labels=continuations[:, 1:]).item()
            if recall < 0.02:
                break
    assert recall < 0.02, recall
    return model


def test_a_model_that_memorised_the_answers_scores_one_and_shuffled_answers_do_not(work, tmp_path):
    specs = zero_shot.resolve_tasks(["arc_easy", "piqa"])
    tasks = zero_shot.load_tasks(specs, work / "tasks", tmp_path / "t", None)
    hf_dir = export(_memorised_model(tasks, work / "sp.model"), work / "sp.model", tmp_path / "hf")
    model, tokenizer = hf_model.load(hf_dir, "cpu", "fp32")
    right = zero_shot.evaluate(model, tokenizer, specs, tasks, 16, None)
    assert [(r.metrics["acc"], r.metrics["acc_norm"]) for r in right] == [(1.0, 1.0)] * 2
    shuffled = zero_shot.load_tasks(specs, work / "shuffled", tmp_path / "s", None)
    wrong = zero_shot.evaluate(model, tokenizer, specs, shuffled, 16, None)
    assert all(r.score == 0.0 for r in wrong), [r.metrics for r in wrong]


def _transformers_nll(model, ids, seq_length):
    """Direct transformers computation: HF's own shifted loss on each window plus the token that follows it."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, seq_length):
            chunk = torch.tensor([ids[s:s + seq_length + 1]])
            n = chunk.shape[1] - 1
            nll += model(chunk, labels=chunk).loss.double().item() * n
            count += n
    return nll, count


def test_text_perplexity_and_bits_per_byte_equal_transformers(work, tmp_path):
    text = PROSE * 6 + "Ünïcode café — naïve 😀.\n"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    model, tokenizer = hf_model.load(hf_model.llama_dir(work / "hf_ls", tmp_path), "cpu", "fp32")  # unrolled LS
    got = perplexity.text_perplexity(model, tokenizer, tmp_path / "t.txt", 48, 3)
    ids = tokenizer(text)["input_ids"]
    nll, count = _transformers_nll(model, ids, 48)
    assert got.tokens == count == len(ids) - 1 and got.windows == math.ceil(count / 48) > 2
    assert got.perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert got.bits_per_byte == pytest.approx(nll / math.log(2) / len(text.encode("utf-8")), rel=1e-4)
    limited = perplexity.text_perplexity(model, tokenizer, tmp_path / "t.txt", 48, 3, max_windows=1)
    assert (limited.windows, limited.tokens) == (1, 48) and limited.bytes < got.bytes


def test_dataset_perplexity_equals_transformers(work, tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 320, n) for n in (40, 75, 9, 130)]
    with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
        for d in docs:
            w.add_document(d)
    llama = hf_model.llama_dir(work / "hf_ls", tmp_path)
    model, tokenizer = hf_model.load(llama, "cpu", "fp32")
    got = perplexity.dataset_perplexity(model, tokenizer, tmp_path / "d", 64, 2)
    nll, count = _transformers_nll(model, np.concatenate(docs).tolist(), 64)
    assert got.tokens == count and got.perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)
    limited = perplexity.dataset_perplexity(model, tokenizer, tmp_path / "d", 64, 2, max_windows=2)
    assert (limited.windows, limited.tokens) == (2, 128)
    with pytest.raises(EvaluationError, match="no such file"):
        perplexity.dataset_perplexity(model, tokenizer, tmp_path / "missing", 64, 2)


def test_bad_inputs_fail_with_one_line_naming_them(work, tmp_path):
    def fails(*args):
        res = evaluate_tool(*args, check=False)
        assert res.returncode == 1 and res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr
        return res.stderr

    partial = tmp_path / "partial"
    write_task_files(partial, GOLD)
    (partial / "hellaswag.jsonl").unlink()
    err = fails("--hf", work / "hf_ls", "--data-dir", partial, "--tasks", "arc_easy,hellaswag")
    assert "no data file for task hellaswag (expected hellaswag.jsonl or hellaswag.parquet)" in err
    assert str(partial) in err
    (partial / "arc_easy.jsonl").write_text(json.dumps({"q": "What?", "choices": ["a", "b"], "answer": 0}) + "\n")
    rows = task_rows(GOLD)["piqa"]
    rows[2]["label"] = 5
    (partial / "piqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for task, message in [("arc_easy", "task arc_easy: unreadable or not in the task's Hub schema "
                                        "(UndefinedError: 'question' is undefined)"),
                          ("piqa", "row 3: answer 5 is not one of task piqa's 2 choices")]:
        with pytest.raises(EvaluationError) as e:
            zero_shot.load_tasks(zero_shot.resolve_tasks([task]), partial, tmp_path / task, None)
        assert str(e.value) == f"{message} ({partial / (task + '.jsonl')})"
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    err = fails("--hf", gpt2, "--text", tmp_path / "none.txt")
    assert "no such file" in err
    (tmp_path / "t.txt").write_text("text")
    err = fails("--hf", gpt2, "--text", tmp_path / "t.txt")
    assert "model_type 'gpt2' is not a Llama or MobileLLM export" in err and str(gpt2 / "config.json") in err
    assert not any(tmp_path.glob("*.json"))


def test_reference_rows_match_the_readme_and_presets():
    readme = (ROOT / "README.md").read_text()
    for name, row in PAPER_ROWS.items():
        line = re.search(rf"^\| {re.escape(name)} \|(.*)\|$", readme, re.M)
        values = [float(v) for v in line.group(1).split("|")]
        assert values[:-1] == list(row) and values[-1] == pytest.approx(sum(row) / len(row), abs=0.051)
    assert reference_row(get_config("125M", vocab_size=512)) == "MobileLLM-125M"
    assert reference_row(get_config("350M", layer_sharing=True)) == "MobileLLM-LS-350M"
    assert reference_row(get_config("600M")) is None and reference_row(get_config("tiny")) is None


def test_unrolled_layer_sharing_is_recognised(work, tmp_path):
    model, _ = hf_model.load(hf_model.llama_dir(work / "hf_ls", tmp_path), "cpu", "fp32")
    assert hf_model.architecture(model).layer_sharing and hf_model.architecture(model).num_layers == 2
    plain = export(tiny_model(), work / "sp.model", tmp_path / "plain")
    assert not hf_model.architecture(hf_model.load(plain, "cpu", "auto")[0]).layer_sharing


@pytest.fixture(scope="module")
def trained(work, tmp_path_factory):
    """A short training run whose last validation falls on its saved iteration."""
    d = tmp_path_factory.mktemp("trained")
    make_corpus(d / "corpus", num_docs=120)
    args = tiny_args(d / "corpus", d, iters=6, zero=1, **{"--save": d / "ckpt", "--eval-interval": 3,
                                                            "--eval-iters": 2, "--split": "90,5,5"})
    return d, args, run_pretrain(args + ["--tensorboard-dir", str(d / "tb_train")])


def test_skip_train_logs_the_last_validation_loss_and_writes_nothing(trained, capsys):
    d, args, res = trained
    last = [line for line in res.stdout.splitlines() if line.startswith(" validation at iteration 6 ")]
    saved = sorted(p.name for p in (d / "ckpt").iterdir())
    latest = (d / "ckpt" / "latest").read_text()
    skip = run_pretrain(args + ["--load", str(d / "ckpt"), "--skip-train", "--tensorboard-dir", str(d / "tb")])
    lines = skip.stdout.splitlines()
    assert last and last[0] in lines  # same loss, same iteration, as printed
    test_line = next(line for line in lines if line.startswith(" test at iteration 6 "))
    assert "lm loss PPL" in test_line and "iteration 7" not in skip.stdout
    assert sorted(p.name for p in (d / "ckpt").iterdir()) == saved and (d / "ckpt" / "latest").read_text() == latest
    scalars, trained_scalars = read_scalars(d / "tb"), read_scalars(d / "tb_train")
    assert scalars["valid/loss"] == {6: trained_scalars["valid/loss"][6]}  # bitwise, as logged
    assert set(scalars["test/loss"]) == {6} and "train/loss" not in scalars
    with pytest.raises(SystemExit) as exc:  # the trainer's entry point in this process: refused at parsing
        pretrain.main(args + ["--skip-train"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1 and err[-1] == "error: --skip-train needs a checkpoint to evaluate (--load)"


def test_checkpoint_is_exported_and_evaluated(work, trained, tmp_path):
    d = trained[0]
    (tmp_path / "t.txt").write_text(PROSE * 4)
    evaluate_tool("--checkpoint", d / "ckpt", "--tokenizer-model", work / "sp.model", "--text", tmp_path / "t.txt",
                  "--seq-length", 32, "--output", tmp_path / "p.json")
    got = json.loads((tmp_path / "p.json").read_text())
    _, cfg, state = read_checkpoint(d / "ckpt")
    hf = write_hf(state, cfg, tmp_path / "hf", dtype="fp32", tokenizer_model=str(work / "sp.model"))
    model, tokenizer = hf_model.load(hf, "cpu", "fp32")
    want = perplexity.text_perplexity(model, tokenizer, tmp_path / "t.txt", 32, 8)
    assert got["perplexity"] == pytest.approx(want.perplexity, rel=1e-5) and got["tokens"] == want.tokens
    assert got["bits_per_byte"] == pytest.approx(want.bits_per_byte, rel=1e-5)
    err = evaluate_tool("--checkpoint", d / "ckpt", "--text", tmp_path / "t.txt", check=False).stderr
    assert err == "error: exporting a checkpoint for evaluation needs its tokenizer (--tokenizer-model)\n"


def test_generated_tasks_include_lm_evals_own_and_change_only_data_and_metrics(tmp_path):
    tasks = zero_shot.paper_tasks()
    arc = zero_shot.task_config(tasks["arc_easy"], tmp_path / "arc_easy.jsonl")
    assert arc["include"] == str(tasks["arc_easy"].task_file) and tasks["arc_easy"].task_file.is_file()
    assert arc["dataset_path"] == "json" and arc["dataset_kwargs"] == {"data_files": {"test": str(tmp_path /
                                                                                                  "arc_easy.jsonl")}}
    assert arc["test_split"] == "test" and arc["training_split"] is None and arc["validation_split"] is None
    assert [m["metric"] for m in arc["metric_list"]] == ["acc", "acc_norm"]
    boolq = zero_shot.task_config(tasks["boolq"], tmp_path / "boolq.parquet")
    assert boolq["dataset_path"] == "parquet" and boolq["validation_split"] == "validation"
    assert boolq["test_split"] is None and "doc_to_text" not in boolq  # prompts stay lm-eval's
    hub = zero_shot.task_config(tasks["siqa"], None)
    assert set(hub) == {"include", "task", "metric_list"} and hub["task"] == "social_iqa"
    assert zero_shot.resolve_tasks(["social_iqa", "siqa", "piqa"]) == [tasks["siqa"], tasks["piqa"]]


def test_table_sets_the_paper_row_beside_ours_over_the_same_columns():
    tasks = zero_shot.paper_tasks()
    results = [zero_shot.TaskResult(tasks[name], 5, {"acc": 0.6, "acc_norm": 0.4})
               for name in ("arc_easy", "boolq")]
    table = zero_shot.format_table(results, "mine", "MobileLLM-LS-125M").splitlines()
    assert table[:4] == ["| model | ARC-e | BoolQ | avg |", "|---|---|---|---|", "| mine | 40.0 | 60.0 | 50.0 |",
                         "| MobileLLM-LS-125M (paper) | 45.8 | 60.4 | 53.1 |"]
    assert "| boolq | boolq | 5 | 60.0 | 40.0 | acc |" in table
