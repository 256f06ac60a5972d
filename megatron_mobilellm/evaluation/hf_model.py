"""The model under evaluation: a Llama-format Hugging Face directory, read from local files only.

``--checkpoint`` exports a training checkpoint with the project's exporter first; a compact MobileLLM-format
export (which transformers cannot load without remote code) is unrolled into a Llama directory the same way.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import torch

from megatron_mobilellm.checkpoint_layout import read_checkpoint
from megatron_mobilellm.config import ModelConfig
from megatron_mobilellm.convert.hf_format import DTYPES, ExportError, config_from_hf, read_hf, write_hf
from megatron_mobilellm.errors import CheckpointError, EvaluationError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def export_checkpoint(checkpoint: str | Path, tokenizer_model: str | None, out: Path) -> Path:
    """The ``latest`` checkpoint of a training run as a full-precision Llama export at ``out``."""
    if tokenizer_model is None:
        raise EvaluationError("exporting a checkpoint for evaluation needs its tokenizer (--tokenizer-model)")
    if not Path(tokenizer_model).is_file():
        raise EvaluationError(f"no such tokenizer model ({tokenizer_model})")
    try:
        _, cfg, state = read_checkpoint(checkpoint)
        return write_hf(state, cfg, out, dtype="fp32", tokenizer_model=tokenizer_model)
    except (CheckpointError, ExportError) as e:
        raise EvaluationError(str(e)) from None


def llama_dir(hf_dir: str | Path, scratch: Path) -> Path:
    """``hf_dir`` itself when it is a Llama export; a MobileLLM-format one unrolled into ``scratch``."""
    hf_dir = Path(hf_dir)
    config = hf_dir / "config.json"
    if not config.is_file():
        raise EvaluationError(f"not a Hugging Face export: no config.json ({hf_dir})")
    try:
        hf_config = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise EvaluationError(f"config.json is not JSON ({config})") from None
    model_type = hf_config.get("model_type")
    if model_type not in ("llama", "mobilellm"):
        raise EvaluationError(f"model_type {model_type!r} is not a Llama or MobileLLM export ({config})")
    if not any((hf_dir / f).is_file() for f in _TOKENIZER_FILES):
        raise EvaluationError(f"no tokenizer in the export (export with --tokenizer-model) ({hf_dir})")
    if model_type == "llama":
        return hf_dir
    try:
        state, cfg = read_hf(hf_dir)
    except ExportError as e:
        raise EvaluationError(str(e)) from None
    out = write_hf(state, cfg, scratch / "llama", dtype=_DTYPE_NAMES.get(hf_config.get("torch_dtype"), "fp32"))
    for f in hf_dir.iterdir():  # the export's own tokenizer, as it is
        if f.name.startswith(("tokenizer", "special_tokens_map")):
            shutil.copy(f, out / f.name)
    return out


def _has_protobuf() -> bool:
    try:
        return importlib.util.find_spec("google.protobuf") is not None
    except ModuleNotFoundError:  # no ``google`` namespace at all
        return False


def load(hf_dir: Path, device: str, dtype: str) -> tuple[torch.nn.Module, object]:
    """transformers' model (eval mode, on ``device``) and tokenizer, never resolved on the Hub."""
    import transformers

    if (hf_dir / "tokenizer.model").is_file() and not _has_protobuf():
        # transformers 5 converts a SentencePiece model through protobuf and otherwise reports "tiktoken is required".
        raise EvaluationError("reading the SentencePiece tokenizer needs protobuf: pip install -e '.[eval]' "
                              f"({hf_dir / 'tokenizer.model'})")
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, local_files_only=True, dtype="auto" if dtype == "auto" else DTYPES[dtype])
    return model.to(device).eval(), tokenizer


def architecture(model: torch.nn.Module) -> ModelConfig:
    """Our config of a loaded Llama; consecutive identical layer pairs are read as an unrolled LS model."""
    hf_cfg = model.config.to_dict()
    layers = model.model.layers
    shared = len(layers) % 2 == 0 and all(
        all(torch.equal(a, b) for a, b in zip(layers[i].state_dict().values(), layers[i + 1].state_dict().values()))
        for i in range(0, len(layers), 2))
    return config_from_hf(hf_cfg, layer_sharing=shared)
