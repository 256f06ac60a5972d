"""On-device export: MobileLLM → GGUF, checked by running the file in llama.cpp against transformers' Llama."""

import importlib
import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
import transformers

from helpers import ROOT, make_corpus, require, run_pretrain, run_tool, tiny_args
from megatron_mobilellm.config import ModelConfig


def optional(module: str, install: str):
    """An optional dependency of the on-device export (absent: skipped with the reason, failed under CI)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        require(False, f"needs {module}, not installed ({install})")


gguf = optional("gguf", "pip install -e .[ondevice]")

from megatron_mobilellm.convert import gguf_format  # noqa: E402  (needs gguf)
from megatron_mobilellm.convert.gguf_format import read_vocabulary, write_gguf  # noqa: E402
from megatron_mobilellm.convert.hf_format import ExportError, read_hf, write_hf  # noqa: E402
from megatron_mobilellm.model import MobileLLM  # noqa: E402

# max |Δlogits| against transformers with llama.cpp's KV cache in f32, so an f32 file must be exact up to rounding
TOLERANCES = {"f32": 1e-4, "f16": 3e-2, "q8_0": 0.5}
# Each break is a wrong mapping a converter can plausibly make; every one must push llama.cpp far off transformers.
BREAKS = {
    "no rope permutation": lambda t, cfg: {k: (_unpermute(v, cfg, k) if "attn_q" in k or "attn_k" in k else v)
                                           for k, v in t.items()},
    "K permuted with the query head count (GQA split)": lambda t, cfg: {
        k: (gguf_format.rope_permute(_unpermute(v, cfg, k), cfg.num_attention_heads) if "attn_k" in k else v)
        for k, v in t.items()},
    "KV groups swapped": lambda t, cfg: {k: (v.view(cfg.num_query_groups, -1, v.shape[1]).flip(0).reshape(v.shape)
                                             if "attn_k" in k or "attn_v" in k else v) for k, v in t.items()},
    "attention output transposed": lambda t, cfg: {k: (v.t().contiguous() if "attn_output" in k else v)
                                                   for k, v in t.items()},
    "gate and up swapped": lambda t, cfg: {k: t[k.replace("gate", "up")] if "ffn_gate" in k else
                                           t[k.replace("up", "gate")] if "ffn_up" in k else v for k, v in t.items()},
}
TEXT = "\n".join(f"Return the number of items in list {i}. The default value is {i * 7} unless the file does not "
                f"exist. This module provides helpers for path {i}." for i in range(300))


def _unpermute(w, cfg, name):
    heads = cfg.num_attention_heads if "attn_q" in name else cfg.num_query_groups
    return w.reshape(heads, w.shape[0] // heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def llama_cpp():
    return optional("llama_cpp", "CMAKE_ARGS=-DLLAVA_BUILD=OFF pip install llama-cpp-python")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    (d / "text.txt").write_text(TEXT)
    spm.SentencePieceTrainer.train(input=str(d / "text.txt"), model_prefix=str(d / "sp"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, minloglevel=2, pad_id=3)
    return d / "sp.model"


def tiny_config(**overrides) -> ModelConfig:
    """GQA (4 query heads, 2 groups), head_dim ≠ hidden/heads, non-default θ and ε, vocabulary padded past the
    tokenizer's 400 pieces."""
    fields = dict(num_layers=2, hidden_size=48, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                  kv_channels=16, vocab_size=416, max_position_embeddings=128, rotary_base=50000.0,
                  norm_epsilon=1e-6)
    return ModelConfig(**{**fields, **overrides})


def random_state(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Unit-scale activations (unlike the 0.02 init) so that attention is not uniform and logits spread: any
    mis-mapped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    state = MobileLLM(cfg).state_dict()
    return {k: (1 + 0.3 * torch.randn(v.shape, generator=g)) if v.ndim == 1
            else torch.randn(v.shape, generator=g) / v.shape[1] ** 0.5 for k, v in state.items()}


def tool(*args, check=True):
    return run_tool("export_ondevice.py", *args, check=check)


def hf_export(tmp_path, cfg, tokenizer, seed=0):
    state = random_state(cfg, seed)
    return write_hf(state, cfg, tmp_path / "hf", "fp32", "llama", str(tokenizer)), state


def llama_cpp_logits(llama_cpp, path, ids: list[int]) -> torch.Tensor:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids), n_batch=len(ids), logits_all=True, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(ids)
    logits = torch.from_numpy(llm.scores[:len(ids)].copy())
    llm.close()
    return logits


def max_diff_vs_transformers(llama_cpp, gguf_path, hf_dir, vocab_size, seed=1) -> float:
    ids = torch.randint(0, vocab_size, (48,), generator=torch.Generator().manual_seed(seed)).tolist()
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    return (llama_cpp_logits(llama_cpp, gguf_path, ids) - want).abs().max().item()


def test_file_holds_the_model_and_tokenizer(tmp_path, tokenizer):
    import sentencepiece as spm

    cfg = tiny_config(layer_sharing=True)
    state = random_state(cfg)
    out = write_gguf(state, cfg, read_vocabulary(tokenizer, cfg.vocab_size), tmp_path / "m.gguf", "q8_0")
    r = gguf.GGUFReader(out)
    field = lambda key: r.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("llama.block_count") == cfg.num_passes == 4
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (4, 2)
    assert field("llama.rope.dimension_count") == 16 and field("llama.embedding_length") == 48
    assert field("llama.rope.freq_base") == 50000.0
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id"),
            field("tokenizer.ggml.unknown_token_id"), field("tokenizer.ggml.padding_token_id")) == \
        (sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id())
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size and tokens[:400] == [sp.id_to_piece(i) for i in range(400)]
    assert field("tokenizer.ggml.scores")[:400] == pytest.approx([sp.get_score(i) for i in range(400)])
    types = field("tokenizer.ggml.token_type")
    assert types[sp.bos_id()] == gguf.TokenType.CONTROL and types[sp.unk_id()] == gguf.TokenType.UNKNOWN
    assert types[sp.piece_to_id("<0x41>")] == gguf.TokenType.BYTE and set(types[400:]) == {gguf.TokenType.UNUSED}
    tensors = {t.name: t for t in r.tensors}
    assert "output.weight" not in tensors and "token_embd.weight" in tensors  # tied: stored once
    assert len(tensors) == 2 + 9 * cfg.num_passes
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.3.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    # LS: pass j of block i is layer 2i + j, stored with the block's weights
    q = lambda name: gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type)  # noqa: E731
    np.testing.assert_array_equal(q("blk.2.attn_q.weight"), q("blk.3.attn_q.weight"))
    assert not np.array_equal(q("blk.1.attn_q.weight"), q("blk.2.attn_q.weight"))
    assert not list(tmp_path.glob(".*"))  # no temporary left beside the file


@pytest.mark.parametrize("rope_key", ["rope_theta", "rope_parameters"])
def test_rope_theta_read_from_either_config_key(tmp_path, tokenizer, rope_key):
    cfg = tiny_config(rotary_base=123456.0)
    hf, _ = hf_export(tmp_path, cfg, tokenizer)
    config = json.loads((hf / "config.json").read_text())
    theta = config.pop("rope_theta")
    if rope_key == "rope_parameters":  # transformers 5 writes this instead of rope_theta
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    else:
        config["rope_theta"] = theta
    (hf / "config.json").write_text(json.dumps(config))
    state, read_cfg = read_hf(hf)
    write_gguf(state, read_cfg, read_vocabulary(tokenizer, cfg.vocab_size), tmp_path / "m.gguf", "f32")
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["llama.rope.freq_base"].contents() == 123456.0


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("variant", ["gqa", "ls-untied"])
def test_llama_cpp_matches_transformers(llama_cpp, tmp_path, tokenizer, outtype, variant):
    cfg = tiny_config() if variant == "gqa" else tiny_config(layer_sharing=True, tie_embeddings=False)
    hf, state = hf_export(tmp_path, cfg, tokenizer)
    write_gguf(state, cfg, read_vocabulary(tokenizer, cfg.vocab_size), tmp_path / "m.gguf", outtype)
    assert max_diff_vs_transformers(llama_cpp, tmp_path / "m.gguf", hf, cfg.vocab_size) <= TOLERANCES[outtype]


def test_cli_verify_runs_the_file_in_llama_cpp(llama_cpp, tmp_path, tokenizer):
    cfg = tiny_config()
    hf, _ = hf_export(tmp_path, cfg, tokenizer)
    res = tool("--hf", hf, "--outtype", "f32", "--output", tmp_path / "m.gguf", "--verify")
    assert "64/64 greedy tokens agree, tokenizer 4/4 prompts identical" in res.stdout, res.stdout
    assert "tied embedding stored once" in res.stdout
    res = tool("--hf", hf, "--outtype", "f32", "--output", tmp_path / "m.gguf", "--overwrite", "--verify",
               "--tolerance", "1e-9", check=False)  # llama.cpp's f16 KV cache cannot be this close
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith("error: the GGUF does not"), \
        res.stderr


@pytest.mark.parametrize("name", list(BREAKS))
def test_a_wrong_mapping_is_caught(llama_cpp, tmp_path, tokenizer, monkeypatch, name):
    """The parity check above must fail for each plausible converter bug, so it cannot pass by accident."""
    cfg = tiny_config(hidden_size=64)  # = heads × head_dim, so a transposed attention output still loads
    hf, state = hf_export(tmp_path, cfg, tokenizer)
    right = gguf_format.gguf_tensors
    monkeypatch.setattr(gguf_format, "gguf_tensors", lambda s, c: BREAKS[name](right(s, c), c))
    write_gguf(state, cfg, read_vocabulary(tokenizer, cfg.vocab_size), tmp_path / "bad.gguf", "f32")
    assert max_diff_vs_transformers(llama_cpp, tmp_path / "bad.gguf", hf, cfg.vocab_size) > 0.1


def test_bad_input_one_line_exit_1_nothing_written(tmp_path, tokenizer, capsys):
    cfg = tiny_config()
    hf, _ = hf_export(tmp_path, cfg, tokenizer)
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    no_tok = tmp_path / "no_tokenizer"
    shutil.copytree(hf, no_tok)
    (no_tok / "tokenizer.model").unlink()
    (tmp_path / "exists.gguf").write_bytes(b"mine")
    out = tmp_path / "out" / "m.gguf"
    cases = {
        "is not a MobileLLM or Llama model": ["--hf", tmp_path / "gpt2", "--output", out],
        "no SentencePiece tokenizer.model": ["--hf", no_tok, "--output", out],
        "no SentencePiece tokenizer at": ["--hf", hf, "--tokenizer-model", tmp_path / "nope.model", "--output", out],
        "is not a SentencePiece model": ["--hf", hf, "--tokenizer-model", hf / "config.json", "--output", out],
        "outtype 'q3' is not supported": ["--hf", hf, "--outtype", "q3", "--output", out],
        "format 'onnx' is not supported": ["--hf", hf, "--format", "onnx", "--output", out],
        "--checkpoint needs --tokenizer-model": ["--checkpoint", tmp_path, "--output", out],
        "exists; pass --overwrite": ["--hf", hf, "--output", tmp_path / "exists.gguf"],
        "is not a GGUF file; refusing": ["--hf", hf, "--output", tmp_path / "exists.gguf", "--overwrite"],
        "config.json implies (100, ": ["--hf", hf, "--output", out],  # weights that disagree with their config
    }
    res = tool(*cases["is not a MobileLLM or Llama model"], check=False)  # the real process: exit status 1
    assert res.returncode == 1 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    spec = importlib.util.spec_from_file_location("export_ondevice", ROOT / "tools" / "export_ondevice.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    config = json.loads((hf / "config.json").read_text())
    for expected, args in cases.items():  # in this process: one torch import instead of one per case
        if expected.startswith("config.json implies"):
            (hf / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
        assert cli.main(list(map(str, args))) == 1, expected
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (expected, captured.err)
        assert not captured.out and not out.parent.exists() and (tmp_path / "exists.gguf").read_bytes() == b"mine"
        assert not list(tmp_path.glob(".*tmp*"))
    with pytest.raises(ExportError, match="the tokenizer has .* pieces but the model's vocabulary is 100"):
        read_vocabulary(tokenizer, 100)  # a tokenizer larger than the model's embedding


def test_checkpoint_export_and_llama_cpp_quantization(llama_cpp, tmp_path, tokenizer):
    """A real training checkpoint through --checkpoint at f16 and q8_0 (verified) and q4_0 (llama.cpp's quantizer,
    reported only)."""
    corpus = make_corpus(tmp_path / "corpus", num_docs=40, vocab=400)
    run_pretrain(tiny_args(corpus, tmp_path, iters=4, zero=1, **{"--save": tmp_path / "ckpt", "--eval-iters": 0,
                                                                  "--vocab-size": 400}))
    sizes = {}
    for outtype in ["f16", "q8_0", "q4_0"]:
        out = tmp_path / f"m-{outtype}.gguf"
        res = tool("--checkpoint", tmp_path / "ckpt", "--tokenizer-model", tokenizer, "--outtype", outtype,
                   "--output", out, "--verify")
        assert f"[{outtype}," in res.stdout and "tokenizer 4/4 prompts identical" in res.stdout, res.stdout
        sizes[outtype] = out.stat().st_size
    assert "no tolerance for this outtype" in res.stdout
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f16"]
