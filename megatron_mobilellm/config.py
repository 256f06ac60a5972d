"""MobileLLM model configuration and named presets.

The presets are the paper's Table 9 / the released configs: deep-and-thin LLaMA-style decoders with SwiGLU,
grouped-query attention, head_dim 64 and tied input/output embeddings. ``python -m megatron_mobilellm.config``
prints each preset with its exact parameter count.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from megatron_mobilellm.errors import ArgumentParser


@dataclass
class ModelConfig:
    num_layers: int
    """Number of distinct transformer blocks (weights); LS applies each ``layer_repeat`` times."""
    hidden_size: int
    """Residual stream width."""
    ffn_hidden_size: int
    """SwiGLU inner width (each of gate and up)."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: int
    """Key/value heads (GQA groups), Megatron's name."""
    kv_channels: int = 64
    """Per-head dimension."""
    vocab_size: int = 32000
    """LLaMA SentencePiece vocabulary."""
    max_position_embeddings: int = 2048
    """Longest sequence the model is trained for."""
    rotary_base: float = 10000.0
    """RoPE theta (rotate-half convention, as in LLaMA)."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    init_method_std: float = 0.02
    """Std of the normal initialisation of every matrix."""
    tie_embeddings: bool = True
    """Share the input embedding with the output projection (MobileLLM's embedding sharing)."""
    layer_sharing: bool = False
    """Immediate block-wise layer sharing (MobileLLM-LS): each block runs ``layer_repeat`` times in a row."""
    layer_repeat: int = 2
    """How many consecutive passes each block makes when ``layer_sharing`` is on."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                     "kv_channels", "vocab_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                             f"num_query_groups ({self.num_query_groups})")
        if self.kv_channels % 2:
            raise ValueError(f"kv_channels must be even for RoPE, got {self.kv_channels}")
        if self.layer_repeat < 1:
            raise ValueError(f"layer_repeat must be >= 1, got {self.layer_repeat}")

    @property
    def passes_per_block(self) -> int:
        """Consecutive applications of each block: ``layer_repeat`` with layer sharing, else one."""
        return self.layer_repeat if self.layer_sharing else 1

    @property
    def num_passes(self) -> int:
        """Block applications per forward pass (the depth the computation sees)."""
        return self.num_layers * self.passes_per_block

    @property
    def query_projection_size(self) -> int:
        return self.num_attention_heads * self.kv_channels

    @property
    def kv_projection_size(self) -> int:
        return self.num_query_groups * self.kv_channels

    @property
    def layer_matmul_parameters(self) -> int:
        """Weights of one block that multiply activations (its linear layers; the norms excluded)."""
        d = self.hidden_size
        return (d * (self.query_projection_size + 2 * self.kv_projection_size)  # linear_qkv
                + self.query_projection_size * d  # linear_proj
                + 3 * d * self.ffn_hidden_size)  # linear_fc1 (gate + up), linear_fc2

    @property
    def num_parameters(self) -> int:
        """Exact parameter count of the model this config builds (tests check it against the built model)."""
        per_layer = self.layer_matmul_parameters + 2 * self.hidden_size  # + input_layernorm, pre_mlp_layernorm
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        return embeddings + self.num_layers * per_layer + self.hidden_size  # + final_layernorm

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {sorted(unknown)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


PRESETS: dict[str, dict] = {
    "tiny": dict(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2,
                 kv_channels=16, vocab_size=512, max_position_embeddings=256),
    "125M": dict(num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9, num_query_groups=3),
    "350M": dict(num_layers=32, hidden_size=960, ffn_hidden_size=2560, num_attention_heads=15, num_query_groups=5),
    "600M": dict(num_layers=40, hidden_size=1152, ffn_hidden_size=3072, num_attention_heads=18,
                 num_query_groups=6),
    "1B": dict(num_layers=54, hidden_size=1280, ffn_hidden_size=3584, num_attention_heads=20, num_query_groups=5),
    "1.5B": dict(num_layers=54, hidden_size=1600, ffn_hidden_size=4352, num_attention_heads=25,
                 num_query_groups=5),
}


def get_config(name: str, **overrides) -> ModelConfig:
    """A preset by name, with field overrides (e.g. ``layer_sharing=True``, ``vocab_size=...``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model size {name!r}; choose one of {', '.join(PRESETS)}")
    fields = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return ModelConfig(**fields)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description="Print the MobileLLM presets with exact parameter counts.")
    parser.add_argument("--vocab-size", type=int, default=None, help="override the vocabulary (default 32000)")
    args = parser.parse_args(argv)
    header = (f"{'preset':<8}{'LS':>4}{'layers':>8}{'passes':>8}{'dim':>6}{'heads':>7}{'kv':>4}{'ffn':>7}{'vocab':>7}"
              f"{'params':>16}")
    print(header)
    print("-" * len(header))
    for name in PRESETS:
        for ls in (False, True):
            if ls and name not in ("125M", "350M"):
                continue  # the paper releases LS variants of these two sizes
            cfg = get_config(name, layer_sharing=ls, vocab_size=args.vocab_size)
            print(f"{name:<8}{'yes' if ls else '':>4}{cfg.num_layers:>8}{cfg.num_passes:>8}{cfg.hidden_size:>6}"
                  f"{cfg.num_attention_heads:>7}{cfg.num_query_groups:>4}{cfg.ffn_hidden_size:>7}"
                  f"{cfg.vocab_size:>7}{cfg.num_parameters:>16,}")


if __name__ == "__main__":
    main()
