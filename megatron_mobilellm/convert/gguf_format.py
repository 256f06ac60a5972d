"""MobileLLM → GGUF, llama.cpp's one-file format (``llama`` architecture), written with the ``gguf`` library.

The weights start from the Hugging Face Llama layout (``to_hf``: the fused QKV split per KV group, SwiGLU split
into gate/up, layer-sharing blocks unrolled into identical consecutive layers). What llama.cpp adds on top:

- Q and K rows are permuted per head from the rotate-half RoPE layout (ours and HF's) into llama.cpp's
  interleaved pairs — K with the KV head count, so GQA groups keep their heads.
- The tokenizer rides inside the file: every SentencePiece piece with its score and type, BOS/EOS/UNK/PAD ids and
  the normaliser's dummy-prefix flag; a model vocabulary larger than the tokenizer's is padded with unused pieces.
- The tied embedding is stored once (``token_embd``; llama.cpp reuses it when ``output`` is absent). Norm weights
  stay f32 in every outtype, as llama.cpp expects.

f32/f16/q8_0 are written here; the 4- to 6-bit types are made from the f32 file by llama.cpp's own quantizer.
Every file appears atomically.
"""

from __future__ import annotations

import ctypes
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from megatron_mobilellm.atomic import atomic_path
from megatron_mobilellm.config import ModelConfig
from megatron_mobilellm.convert.hf_format import ExportError
from megatron_mobilellm.model.hf_adapter import to_hf

WRITER_OUTTYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                   "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
LLAMA_CPP_OUTTYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k")
OUTTYPES = (*WRITER_OUTTYPES, *LLAMA_CPP_OUTTYPES)

_T = gguf.MODEL_TENSOR
_LAYER_TENSORS = {"self_attn.q_proj": _T.ATTN_Q, "self_attn.k_proj": _T.ATTN_K, "self_attn.v_proj": _T.ATTN_V,
                  "self_attn.o_proj": _T.ATTN_OUT, "mlp.gate_proj": _T.FFN_GATE, "mlp.up_proj": _T.FFN_UP,
                  "mlp.down_proj": _T.FFN_DOWN, "input_layernorm": _T.ATTN_NORM,
                  "post_attention_layernorm": _T.FFN_NORM}
_GLOBAL_TENSORS = {"model.embed_tokens": _T.TOKEN_EMBD, "model.norm": _T.OUTPUT_NORM, "lm_head": _T.OUTPUT}


@dataclass
class Vocabulary:
    """A SentencePiece tokenizer as GGUF stores it (pieces as UTF-8 bytes, types as ``gguf.TokenType``)."""

    pieces: list[bytes]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int
    """-1 when the tokenizer has no padding piece."""
    add_space_prefix: bool


def read_vocabulary(tokenizer_model: str | Path, vocab_size: int) -> Vocabulary:
    """Every piece of a SentencePiece model, padded with unused pieces up to the model's ``vocab_size``."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    path = Path(tokenizer_model)
    if not path.is_file():
        raise ExportError(f"no SentencePiece tokenizer at {path} (--tokenizer-model)")
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise ExportError(f"{path} is not a SentencePiece model ({e}) (--tokenizer-model)") from None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    if len(proto.pieces) > vocab_size:
        raise ExportError(f"the tokenizer has {len(proto.pieces)} pieces but the model's vocabulary is "
                          f"{vocab_size} ({path})")
    piece_type = sentencepiece_model_pb2.ModelProto.SentencePiece.Type.Name
    pieces = [p.piece.encode() for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [int(gguf.TokenType[piece_type(p.type)]) for p in proto.pieces]
    for i in range(len(pieces), vocab_size):  # the model's embedding rows the tokenizer never produces
        pieces.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    return Vocabulary(pieces, scores, types, sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id(),
                      proto.normalizer_spec.add_dummy_prefix)


def rope_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a Q or K projection from rotate-half order (dims i and i + d/2 form a pair) to llama.cpp's
    interleaved order (dims 2i and 2i + 1): [heads, 2, d/2, in] → [heads, d/2, 2, in]."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, -1).transpose(1, 2).reshape(w.shape)


def gguf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict → GGUF tensor names and layouts (fp32; LS blocks unrolled; tied embedding once)."""
    out: dict[str, torch.Tensor] = {}
    for hf_name, t in to_hf(state, cfg).items():
        stem = hf_name.removesuffix(".weight")
        if stem in _GLOBAL_TENSORS:
            out[gguf.TENSOR_NAMES[_GLOBAL_TENSORS[stem]] + ".weight"] = t.float()
            continue
        _, _, layer, key = stem.split(".", 3)  # model.layers.{i}.{key}
        if key == "self_attn.q_proj":
            t = rope_permute(t, cfg.num_attention_heads)
        elif key == "self_attn.k_proj":
            t = rope_permute(t, cfg.num_query_groups)
        out[gguf.TENSOR_NAMES[_LAYER_TENSORS[key]].format(bid=int(layer)) + ".weight"] = t.float()
    return out


def _encode(t: torch.Tensor, outtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """The array to store and its ggml type (None: the writer reads it from the numpy dtype)."""
    a = t.detach().contiguous().numpy()
    if a.ndim == 1 or outtype == "f32":
        return a, None
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    if outtype == "q8_0" and a.shape[-1] % block == 0:
        return gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return a.astype(np.float16), None  # f16, and q8_0 rows that do not fill whole blocks (llama.cpp does the same)


def _write(path: Path, tensors: dict[str, torch.Tensor], cfg: ModelConfig, vocab: Vocabulary, outtype: str,
           name: str) -> None:
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_name(name)
    w.add_file_type(WRITER_OUTTYPES[outtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_passes)
    w.add_feed_forward_length(cfg.ffn_hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_query_groups)
    w.add_key_length(cfg.kv_channels)
    w.add_value_length(cfg.kv_channels)
    w.add_rope_dimension_count(cfg.kv_channels)
    w.add_rope_freq_base(cfg.rotary_base)
    w.add_layer_norm_rms_eps(cfg.norm_epsilon)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("llama")  # llama.cpp's name for SentencePiece
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab.pieces)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    w.add_unk_token_id(vocab.unk_id)
    if vocab.pad_id >= 0:
        w.add_pad_token_id(vocab.pad_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(vocab.add_space_prefix)
    for tensor_name, t in tensors.items():
        array, raw_dtype = _encode(t, outtype)
        w.add_tensor(tensor_name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=True)
    w.close()


def _llama_cpp(outtype: str):
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(f"{outtype} needs llama.cpp's quantizer: pip install llama-cpp-python "
                          f"(--outtype)") from None
    return llama_cpp


def _quantize_with_llama_cpp(src: Path, dst: Path, outtype: str) -> None:
    llama_cpp = _llama_cpp(outtype)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{outtype.upper()}")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise ExportError(f"llama.cpp could not quantize {src} to {outtype} (--outtype)")


def check_output(output: str | Path, outtype: str, overwrite: bool) -> None:
    """Refuse an unsupported outtype or an output that is in the way — before any expensive work."""
    if outtype not in OUTTYPES:
        raise ExportError(f"outtype {outtype!r} is not supported; choose one of {', '.join(OUTTYPES)} (--outtype)")
    if outtype in LLAMA_CPP_OUTTYPES:
        _llama_cpp(outtype)
    output = Path(output)
    if output.is_dir():
        raise ExportError(f"{output} is a directory; give a file name (--output)")
    if output.exists() and not overwrite:
        raise ExportError(f"{output} exists; pass --overwrite to replace it (--output)")
    if output.exists() and not _is_gguf(output):  # --overwrite replaces an earlier export, nothing else
        raise ExportError(f"{output} is not a GGUF file; refusing to replace it (--output)")


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def write_gguf(state: dict[str, torch.Tensor], cfg: ModelConfig, vocab: Vocabulary, output: str | Path,
               outtype: str = "f16", name: str | None = None, overwrite: bool = False) -> Path:
    """Write the GGUF file; nothing appears at ``output`` unless it was written completely."""
    check_output(output, outtype, overwrite)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tensors = gguf_tensors(state, cfg)
    name = name or output.stem
    if outtype in WRITER_OUTTYPES:
        with atomic_path(output) as tmp:
            _write(tmp, tensors, cfg, vocab, outtype, name)
        return output
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as work:
        full = Path(work) / "f32.gguf"
        _write(full, tensors, cfg, vocab, "f32", name)
        with atomic_path(output) as tmp:
            _quantize_with_llama_cpp(full, tmp, outtype)
    return output
