"""The paper's zero-shot rows (also the README's table) and which of them a model's architecture corresponds to."""

from __future__ import annotations

from megatron_mobilellm.config import PRESETS, ModelConfig

COLUMNS = ("ARC-e", "ARC-c", "BoolQ", "PIQA", "SIQA", "HellaSwag", "OBQA", "WinoGrande")
"""The paper's column order."""

PAPER_ROWS: dict[str, tuple[float, ...]] = {
    "MobileLLM-125M": (43.9, 27.1, 60.2, 65.3, 42.4, 38.9, 39.5, 53.1),
    "MobileLLM-LS-125M": (45.8, 28.7, 60.4, 65.7, 42.9, 39.5, 41.1, 52.1),
    "MobileLLM-350M": (53.8, 33.5, 62.4, 68.6, 44.7, 49.6, 40.0, 57.6),
    "MobileLLM-LS-350M": (54.4, 32.5, 62.8, 69.8, 44.1, 50.6, 45.8, 57.2),
}
"""Accuracy (%) per column, MobileLLM paper Table 3 (zero-shot common-sense reasoning)."""

_SHAPE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels")


def reference_row(cfg: ModelConfig) -> str | None:
    """The paper row for a model of this preset's shape and layer sharing (the vocabulary is not compared)."""
    for preset, fields in PRESETS.items():
        shape = ModelConfig(**fields)
        if all(getattr(cfg, f) == getattr(shape, f) for f in _SHAPE):
            name = f"MobileLLM-{'LS-' if cfg.layer_sharing else ''}{preset}"
            return name if name in PAPER_ROWS else None
    return None
