"""DeepSpeed checkpoint → Hugging Face → back, verified by logits and generation against transformers."""

import json

import numpy as np
import pytest
import torch
import transformers

from helpers import run_pretrain, run_tool, tiny_args
from megatron_mobilellm.checkpoint_layout import read_checkpoint, read_model_config, resolve_tag
from megatron_mobilellm.convert.hf_format import read_hf
from megatron_mobilellm.data.indexed_dataset import IndexedDatasetWriter
from megatron_mobilellm.generation import generate
from megatron_mobilellm.model import MobileLLM

CORPUS_DOCS = 100


@pytest.fixture(scope="module")
def checkpoints(corpus, tmp_path_factory):
    """2-process runs under ZeRO-3 and ZeRO-1, with and without layer sharing; each one's output is kept beside
    its checkpoint (``stdout.txt``)."""
    out = {}
    for zero, ls in [(3, False), (1, True)]:
        work = tmp_path_factory.mktemp(f"ckpt_z{zero}_ls{int(ls)}")
        extra = {"--save": work / "ckpt", "--eval-iters": 0, **({"--layer-sharing": ""} if ls else {})}
        res = run_pretrain(tiny_args(corpus, work, iters=6, zero=zero, **extra), nproc=2)
        (work / "stdout.txt").write_text(res.stdout)
        out[(zero, ls)] = work / "ckpt"
    return out


def our_model(ckpt) -> MobileLLM:
    _, cfg, state = read_checkpoint(ckpt)
    model = MobileLLM(cfg, attention_backend="eager")
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize("key", [(3, False), (1, True)], ids=["zero3", "zero1-ls"])
def test_export_matches_ours_in_logits_and_greedy_generation(checkpoints, tmp_path, key):
    ckpt = checkpoints[key]
    res = run_tool("convert_checkpoint_to_hf.py", "--checkpoint", ckpt, "--output", tmp_path / "hf", "--dtype", "fp32",
               "--verify")
    assert "verify: max |Δlogits|" in res.stdout
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours = our_model(ckpt)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["num_hidden_layers"] == ours.config.num_passes
    from safetensors.torch import load_file
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-4
    prompt = ids[0, :8].tolist()
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0].tolist()
    assert theirs == generate(ours, prompt, 20)


def test_mobilellm_format_is_compact_and_equivalent(checkpoints, tmp_path):
    ckpt = checkpoints[(1, True)]
    run_tool("convert_checkpoint_to_hf.py", "--checkpoint", ckpt, "--output", tmp_path / "m", "--dtype", "fp32",
         "--format", "mobilellm", "--verify")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["layer_sharing"] is True and cfg["share_embedding"] is True and cfg["num_hidden_layers"] == 2
    state, our_cfg = read_hf(tmp_path / "m")
    assert our_cfg.layer_sharing and our_cfg.num_layers == 2


def make_repeated_corpus(prefix, pattern, copies=40):
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for _ in range(copies):
            w.add_document(np.tile(pattern, 6))


def test_memorised_sequence_survives_export(tmp_path):
    pattern = np.array([7, 300, 12, 451, 99, 5, 230, 18, 77, 410, 63, 88, 190, 333, 41, 256])  # no bos/eos ids
    make_repeated_corpus(tmp_path / "rep", pattern)
    run_pretrain(tiny_args(tmp_path / "rep", tmp_path, iters=60, zero=1,
                           **{"--save": tmp_path / "ckpt", "--eval-iters": 0, "--lr": "1e-2", "--seq-length": 32,
                              "--log-interval": 10}))
    run_tool("convert_checkpoint_to_hf.py", "--checkpoint", tmp_path / "ckpt", "--output", tmp_path / "hf",
         "--dtype", "fp32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    prompt = torch.tensor([np.tile(pattern, 2)[3:11].tolist()])
    out = hf.generate(prompt, max_new_tokens=16, do_sample=False)[0, 8:].tolist()
    assert out == np.tile(pattern, 3)[11:27].tolist()
    seq = torch.tensor([np.tile(pattern, 4).tolist()])
    with torch.no_grad():
        loss = hf(seq, labels=seq).loss.item()
    assert loss < 0.5  # a mis-mapped model scores ~ln(512) = 6.2


def test_hf_round_trip_is_bit_exact_and_training_starts_from_it(corpus, checkpoints, tmp_path):
    run_tool("convert_checkpoint_to_hf.py", "--checkpoint", checkpoints[(3, False)], "--output", tmp_path / "hf1",
         "--dtype", "fp32")
    run_tool("convert_hf_to_checkpoint.py", "--hf", tmp_path / "hf1", "--output", tmp_path / "imported")
    # Re-export the imported weights: the files must be identical to the first export.
    from megatron_mobilellm.convert.hf_format import write_hf
    from safetensors.torch import load_file
    imported = load_file(tmp_path / "imported" / "model.safetensors")
    cfg = read_model_config(checkpoints[(3, False)], resolve_tag(checkpoints[(3, False)]))
    write_hf(imported, cfg, tmp_path / "hf2", dtype="fp32")
    a, b = load_file(tmp_path / "hf1" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Training from the import: its first logged loss is the transformers loss on the same first batch.
    res = run_pretrain(tiny_args(corpus, tmp_path, iters=1, zero=1,
                                 **{"--load": tmp_path / "imported", "--eval-iters": 0, "--num-workers": 0}))
    assert "initialised weights from" in res.stdout
    first_loss = float(res.stdout.split("lm loss")[1].split("|")[0])
    from megatron_mobilellm.data.builder import build_datasets
    ds = build_datasets([str(corpus)], "969,30,1", 64, 7, {"train": 8}, tmp_path / "index_cache")["train"]
    tokens = torch.stack([ds[i]["tokens"] for i in range(8)])
    labels = torch.stack([ds[i]["labels"] for i in range(8)])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf1", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(tokens).logits
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()
    assert first_loss == pytest.approx(ref, abs=1e-5)


def test_released_style_bin_without_lm_head(tmp_path, checkpoints):
    run_tool("convert_checkpoint_to_hf.py", "--checkpoint", checkpoints[(1, True)], "--output", tmp_path / "m",
         "--dtype", "fp32", "--format", "mobilellm")
    from safetensors.torch import load_file
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(tensors, tmp_path / "m" / "pytorch_model.bin")
    state, cfg = read_hf(tmp_path / "m")
    ours = our_model(checkpoints[(1, True)])
    assert all(torch.equal(state[k], v) for k, v in ours.state_dict().items())


def test_tokenizer_round_trips_like_sentencepiece(checkpoints, tmp_path):
    import sentencepiece as spm
    text = "\n".join(f"def function_{i}(x): return x * {i}  # the quick brown fox, naïve café" for i in range(400))
    (tmp_path / "c.txt").write_text(text)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=300,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, minloglevel=2, bos_id=1, eos_id=2, unk_id=0,
                                   pad_id=-1)
    run_tool("convert_checkpoint_to_hf.py", "--checkpoint", checkpoints[(3, False)], "--output", tmp_path / "hf",
         "--tokenizer-model", tmp_path / "sp.model")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for s in ["def function_7(x): return x * 7", "The quick brown fox, naïve café!", "tabs\tand\nnewlines  x",
              "unseen ☃ emoji 😀 and 12345"]:
        ids = tok(s)["input_ids"]
        assert ids == [sp.bos_id()] + sp.encode(s)
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(sp.encode(s)) == s
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)


def test_bad_inputs_give_clear_errors_and_no_output(checkpoints, tmp_path):
    res = run_tool("convert_checkpoint_to_hf.py", "--checkpoint", tmp_path / "none", "--output", tmp_path / "o",
               check=False)
    assert res.returncode == 1 and "no such directory" in res.stderr
    (tmp_path / "empty").mkdir()
    res = run_tool("convert_checkpoint_to_hf.py", "--checkpoint", tmp_path / "empty", "--output", tmp_path / "o",
               check=False)
    assert res.returncode == 1 and "no 'latest' file" in res.stderr
    res = run_tool("convert_checkpoint_to_hf.py", "--checkpoint", checkpoints[(3, False)], "--tag", "iter_0000099",
               "--output", tmp_path / "o", check=False)
    assert res.returncode == 1 and "no checkpoint with tag 'iter_0000099' (available: iter_0000006)" in res.stderr
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(checkpoints[(3, False)], broken)
    shard = sorted((broken / "iter_0000006").glob("*optim_states.pt"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    res = run_tool("convert_checkpoint_to_hf.py", "--checkpoint", broken, "--output", tmp_path / "o", check=False)
    assert res.returncode == 1 and "could not consolidate" in res.stderr
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))


def test_finetune_takes_weights_only(corpus, checkpoints, tmp_path):
    ckpt = checkpoints[(3, False)]
    res = run_pretrain(tiny_args(corpus, tmp_path, iters=2, zero=2, **{"--load": ckpt, "--finetune": "",
                                                                       "--eval-iters": 0}))
    assert "initialised weights from" in res.stdout and "done: 2 iterations, 16 samples" in res.stdout
    fresh = (ckpt.parent / "stdout.txt").read_text()  # that checkpoint's own run: from scratch, same data and seed
    first = lambda out: float(out.split("lm loss")[1].split("|")[0])  # noqa: E731
    assert first(res.stdout) < first(fresh) - 0.2  # starts from the trained weights, not from scratch
    res = run_tool("convert_hf_to_checkpoint.py", "--hf", tmp_path / "missing", "--output", tmp_path / "x", check=False)
    assert res.returncode == 1 and "no config.json" in res.stderr
