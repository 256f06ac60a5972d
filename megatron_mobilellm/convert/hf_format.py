"""Hugging Face directories: write a Llama (or compact MobileLLM-format) export, and read one back.

``llama`` format is a plain ``LlamaForCausalLM`` that loads with ``AutoModelForCausalLM.from_pretrained(dir)`` —
layer-sharing blocks are unrolled into identical consecutive layers. ``mobilellm`` format keeps one layer per
shared block with ``share_embedding``/``layer_sharing`` in the config, as the released MobileLLM remote code
expects. Either way the tied embedding is stored exactly once (``model.embed_tokens.weight``), and the directory
appears atomically: it is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megatron_mobilellm import safe_load
from megatron_mobilellm.atomic import atomic_directory
from megatron_mobilellm.config import ModelConfig
from megatron_mobilellm.errors import UserError
from megatron_mobilellm.model import MobileLLM
from megatron_mobilellm.model.hf_adapter import from_hf, hf_config_dict, to_hf

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
FORMATS = ("llama", "mobilellm")


class ExportError(UserError, ValueError):
    """An output or input Hugging Face directory that cannot be written or read as asked."""


# Every name write_hf creates: --overwrite may replace a folder that holds nothing else.
_EXPORT_FILE = re.compile(r"config\.json|generation_config\.json|model(-\d{5}-of-\d{5})?\.safetensors"
                          r"|model\.safetensors\.index\.json|tokenizer\.model|tokenizer_config\.json"
                          r"|special_tokens_map\.json")


def check_output(output: Path, source: Path | None, overwrite: bool) -> None:
    """Refuse an ``--output`` whose replacement would delete what this tool did not write: the checkpoint being
    read (or a folder holding or inside it), or any folder with more than an earlier export in it."""
    out = output.resolve()
    if source is not None:
        src = source.resolve()
        if out == src or src.is_relative_to(out) or out.is_relative_to(src):
            raise ExportError(f"--output {output} is, holds or lies inside the checkpoint {source}; "
                              "write the export elsewhere")
    if output.is_file() or output.is_symlink():
        raise ExportError(f"--output {output} is a file, not a folder; write the export elsewhere")
    if not output.exists() or not any(output.iterdir()):
        return
    if not overwrite:
        raise ExportError(f"--output {output} exists and is not empty (pass --overwrite to replace an earlier export)")
    foreign = sorted(p.name for p in output.iterdir() if not (p.is_file() and _EXPORT_FILE.fullmatch(p.name)))
    if not (output / "config.json").is_file():
        foreign.insert(0, "no config.json")
    if foreign:
        raise ExportError(f"--output {output} holds more than an earlier export ({', '.join(foreign[:5])}); "
                          "--overwrite only replaces an export, so write elsewhere")


def hf_config(cfg: ModelConfig, fmt: str, dtype: torch.dtype, bos_id: int, eos_id: int) -> dict:
    base = hf_config_dict(cfg, bos_id, eos_id)
    base.update(rope_scaling=None, torch_dtype=_DTYPE_NAMES[dtype], use_cache=True, pretraining_tp=1,
                attention_dropout=0.0)
    if fmt == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **base}
    base.update(num_hidden_layers=cfg.num_layers, share_embedding=cfg.tie_embeddings,
                layer_sharing=cfg.layer_sharing)
    return {"architectures": ["MobileLLMForCausalLM"], "model_type": "mobilellm", **base}


def hf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, fmt: str,
               dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Owned, contiguous tensors (safetensors refuses shared storage) with HF names."""
    compact = ModelConfig(**{**cfg.to_dict(), "layer_sharing": False}) if fmt == "mobilellm" else cfg
    return {k: v.to(dtype).contiguous().clone() for k, v in to_hf(state, compact).items()}


def _save_sharded(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _write_tokenizer(out: Path, tokenizer_model: str) -> tuple[int, int]:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer_model)
    shutil.copy(tokenizer_model, out / "tokenizer.model")
    piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
    special = {"bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id())}
    if sp.pad_id() >= 0:
        special["pad_token"] = piece(sp.pad_id())
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "legacy": False, "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return sp.bos_id(), sp.eos_id()


def write_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, output: str | Path, dtype: str = "bf16",
             fmt: str = "llama", tokenizer_model: str | None = None, overwrite: bool = False,
             max_shard_bytes: int = 2 << 30, source: str | Path | None = None) -> Path:
    """Write the export; nothing appears at ``output`` unless every file was written, and nothing is replaced but
    an earlier export (``source``, the checkpoint read, is never touched)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {FORMATS}")
    output = Path(output)
    check_output(output, Path(source) if source is not None else None, overwrite)
    torch_dtype = DTYPES[dtype]
    with atomic_directory(output) as tmp:
        bos, eos = _write_tokenizer(tmp, tokenizer_model) if tokenizer_model else (1, 2)
        _save_sharded(hf_tensors(state, cfg, fmt, torch_dtype), tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, fmt, torch_dtype, bos, eos), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}, indent=2))
    return output


def _read_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            tensors.update(load_file(str(f)))
        return tensors
    files = sorted(hf_dir.glob("pytorch_model*.bin"))
    if not files:
        raise ExportError(f"--hf {hf_dir}: no *.safetensors or pytorch_model*.bin weights")
    tensors = {}
    for f in files:
        tensors.update(safe_load.load(f))
    return tensors


def _refuse_unrepresentable(hf_cfg: dict) -> None:
    """Refuse an HF config whose model computes something ours cannot (rather than drop it and import a different
    function); the message names the field."""
    checks = [
        ("model_type", hf_cfg.get("model_type") in ("llama", "mobilellm"), "only Llama and MobileLLM models"),
        ("attention_bias", not hf_cfg.get("attention_bias"), "attention projections have no bias here"),
        ("mlp_bias", not hf_cfg.get("mlp_bias"), "MLP projections have no bias here"),
        ("rope_scaling", not hf_cfg.get("rope_scaling"), "only plain RoPE (no scaling)"),
        ("rope_parameters", (hf_cfg.get("rope_parameters") or {}).get("rope_type", "default") == "default",
         "only plain RoPE (rope_type 'default')"),
        ("hidden_act", hf_cfg.get("hidden_act", "silu") == "silu", "the MLP is SwiGLU (SiLU)"),
    ]
    for field, ok, why in checks:
        if not ok:
            raise ExportError(f"config.json: {field} = {hf_cfg.get(field)!r} cannot be represented ({why})")


def config_from_hf(hf_cfg: dict, layer_sharing: bool = False) -> ModelConfig:
    """Our config for an HF Llama or MobileLLM-format config (``layer_sharing`` folds a Llama's layer pairs)."""
    _refuse_unrepresentable(hf_cfg)
    fmt_ls = bool(hf_cfg.get("layer_sharing", False))
    layers = hf_cfg["num_hidden_layers"]
    if layer_sharing and not fmt_ls:
        if layers % 2:
            raise ExportError(f"--layer-sharing: {layers} layers cannot fold into shared pairs")
        layers //= 2
    rope = hf_cfg.get("rope_parameters") or {}
    heads = hf_cfg["num_attention_heads"]
    return ModelConfig(
        num_layers=layers, hidden_size=hf_cfg["hidden_size"], ffn_hidden_size=hf_cfg["intermediate_size"],
        num_attention_heads=heads, num_query_groups=hf_cfg.get("num_key_value_heads", heads),
        kv_channels=hf_cfg.get("head_dim") or hf_cfg["hidden_size"] // heads, vocab_size=hf_cfg["vocab_size"],
        max_position_embeddings=hf_cfg.get("max_position_embeddings", 2048),
        rotary_base=float(hf_cfg.get("rope_theta") or rope.get("rope_theta", 10000.0)),
        norm_epsilon=hf_cfg.get("rms_norm_eps", 1e-5), init_method_std=hf_cfg.get("initializer_range", 0.02),
        tie_embeddings=bool(hf_cfg.get("tie_word_embeddings", hf_cfg.get("share_embedding", True))),
        layer_sharing=layer_sharing or fmt_ls)


def check_representable(hf_cfg: dict, where: Path) -> None:
    """Refuse an HF config whose function a MobileLLM cannot compute, naming the field."""
    kind = hf_cfg.get("model_type")
    if kind not in ("llama", "mobilellm"):
        raise ExportError(f"model_type {kind!r} is not a MobileLLM or Llama model ({where})")
    rope_type = (hf_cfg.get("rope_scaling") or hf_cfg.get("rope_parameters") or {}).get("rope_type", "default")
    found = {"hidden_act": hf_cfg.get("hidden_act", "silu"), "attention_bias": hf_cfg.get("attention_bias", False),
             "mlp_bias": hf_cfg.get("mlp_bias", False), "rope_type": rope_type}
    wanted = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "rope_type": "default"}
    for field, value in found.items():
        if value != wanted[field]:
            raise ExportError(f"{field} = {value!r} cannot be represented by a MobileLLM ({where})")


def read_hf(hf_dir: str | Path, layer_sharing: bool = False) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Our state dict and config from an HF directory (Llama, or MobileLLM format incl. released ``.bin`` files
    without ``lm_head``)."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ExportError(f"--hf {hf_dir}: no config.json")
    config_file = hf_dir / "config.json"
    try:
        hf_cfg = json.loads(config_file.read_text())
        check_representable(hf_cfg, config_file)
        cfg = config_from_hf(hf_cfg, layer_sharing)
    except json.JSONDecodeError as e:
        raise ExportError(f"config.json is not valid JSON: {e} ({config_file})") from None
    except (KeyError, TypeError, AttributeError) as e:  # a missing key, or not a JSON object
        raise ExportError(f"config.json has no usable {e} entry ({config_file})") from None
    tensors = _read_weights(hf_dir)
    if "model.embed_tokens.weight" not in tensors:
        raise ExportError(f"--hf {hf_dir}: no model.embed_tokens.weight in the weights")
    compact = hf_cfg.get("model_type") == "mobilellm"
    # One HF layer per block in the compact format: map as a non-shared model, then mark sharing in the config.
    mapped_cfg = ModelConfig(**{**cfg.to_dict(), "layer_sharing": False}) if compact else cfg
    try:
        mapped = from_hf(tensors, mapped_cfg)
    except KeyError as e:
        raise ExportError(f"the weights have no tensor {e} that config.json implies ({hf_dir})") from None
    except (ValueError, RuntimeError) as e:  # differing shared layers, or q/k/v shapes that do not fit
        raise ExportError(f"the weights do not fit config.json: {e} ({hf_dir})") from None
    with torch.device("meta"):
        expected = MobileLLM(mapped_cfg).state_dict()
    for name, tensor in mapped.items():
        if tensor.shape != expected[name].shape:
            raise ExportError(f"tensor {name} has shape {tuple(tensor.shape)}, config.json implies "
                              f"{tuple(expected[name].shape)} ({hf_dir})")
    used = set(to_hf(mapped, mapped_cfg))
    unused = sorted(k for k in tensors if k not in used and k != "lm_head.weight" and "rotary_emb.inv_freq" not in k)
    if unused:
        raise ExportError(f"{len(unused)} tensors cannot be represented (e.g. {', '.join(unused[:3])}) ({hf_dir})")
    return {k: v.float().contiguous() for k, v in mapped.items()}, cfg
