"""The MobileLLM decoder, with megatron-core's module names.

How it departs from a textbook LLaMA: nothing in the maths. It is deep and thin (e.g. 30 × 576 at 125M), shares
the input embedding with the output projection by default, and with ``layer_sharing`` runs every block twice in a
row with the same weights (``h = block(block(h))``, each pass with its own causal attention) — the paper's
immediate block-wise sharing, which doubles depth at no parameter cost.

State-dict keys: ``embedding.word_embeddings.weight``, ``decoder.layers.{i}.input_layernorm.weight``,
``.self_attention.linear_qkv.weight``, ``.self_attention.linear_proj.weight``, ``.pre_mlp_layernorm.weight``,
``.mlp.linear_fc1.weight`` (gate rows, then up rows), ``.mlp.linear_fc2.weight``, ``decoder.final_layernorm.weight``,
and ``output_layer.weight`` only when embeddings are untied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_mobilellm.config import ModelConfig
from megatron_mobilellm.model.attention import RotaryEmbedding, SelfAttention, check_backend_name, resolve_backend
from megatron_mobilellm.model.loss import linear_cross_entropy
from megatron_mobilellm.model.swiglu import swiglu


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as LLaMA does, then scale in the input's dtype.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return normed * self.weight.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=False)  # [gate; up]
        self.linear_fc2 = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(swiglu(self.linear_fc1(x)))


class TransformerLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_epsilon)
        self.self_attention = SelfAttention(config)
        self.pre_mlp_layernorm = RMSNorm(config.hidden_size, config.norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor, rotary_pos_emb: tuple[torch.Tensor, torch.Tensor],
                attention_backend: str) -> torch.Tensor:
        h = h + self.self_attention(self.input_layernorm(h), rotary_pos_emb, attention_backend)
        return h + self.mlp(self.pre_mlp_layernorm(h))


class Embedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class TransformerDecoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.norm_epsilon)
        self.repeat = config.passes_per_block
        self.activation_checkpointing = False

    def forward(self, h: torch.Tensor, rotary_pos_emb: tuple[torch.Tensor, torch.Tensor],
                attention_backend: str) -> torch.Tensor:
        for layer in self.layers:
            for _ in range(self.repeat):
                if self.activation_checkpointing and torch.is_grad_enabled():
                    h = checkpoint(layer, h, rotary_pos_emb, attention_backend, use_reentrant=False)
                else:
                    h = layer(h, rotary_pos_emb, attention_backend)
        return self.final_layernorm(h)


class MobileLLM(nn.Module):
    """Decoder-only MobileLLM. ``forward(input_ids)`` gives logits; with ``labels`` it gives the mean loss."""

    def __init__(self, config: ModelConfig, attention_backend: str = "auto", loss_chunk_size: int = 4096):
        super().__init__()
        check_backend_name(attention_backend)  # now, not at the first forward
        self.config = config
        self.attention_backend = attention_backend
        self.loss_chunk_size = loss_chunk_size
        self.embedding = Embedding(config)
        self.rotary_pos_emb = RotaryEmbedding(config.kv_channels, config.rotary_base)
        self.decoder = TransformerDecoder(config)
        self.output_layer = (None if config.tie_embeddings
                             else nn.Linear(config.hidden_size, config.vocab_size, bias=False))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """N(0, init_method_std) for every matrix, ones for norms; separate from __init__ for meta-device builds."""
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, self.config.init_method_std, generator=generator)

    def compile(self, scope: str = "blocks", cuda_graphs: bool = False) -> None:
        """torch.compile: fuses norms, RoPE, SwiGLU and residual adds around the matmuls. ``blocks`` compiles each
        block's ``forward`` (compile time flat in depth; the module's own ``__call__`` stays eager, so ZeRO-3's
        gather/release hooks run around the compiled code instead of splitting it); ``decoder`` compiles the whole
        stack as one graph, which removes per-block launch overhead (thin models are CPU-bound) but compiles
        longer. ``cuda_graphs`` also records the compiled forward and backward as CUDA graphs (inductor's
        "reduce-overhead"), replacing thousands of kernel launches per step by one replay. The loss stays
        outside: it is already chunked and fused."""
        options = {"mode": "reduce-overhead"} if cuda_graphs else {}
        if scope == "decoder":
            self.decoder.compile(**options)
        elif scope == "blocks":
            for layer in self.decoder.layers:
                layer.forward = torch.compile(layer.forward, **options)
        else:
            raise ValueError(f"unknown compile scope {scope!r}")

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block in backward instead of keeping its activations."""
        self.decoder.activation_checkpointing = enabled

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embedding.word_embeddings.weight if self.output_layer is None else self.output_layer.weight

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The final-norm hidden states (b, s, d) of input_ids (b, s)."""
        h = self.embedding(input_ids)
        # Decided here, outside any compiled region, so a compiled decoder sees plain inputs and constants.
        rotary_pos_emb = self.rotary_pos_emb(input_ids.shape[1], h.device, h.dtype)
        return self.decoder(h, rotary_pos_emb, resolve_backend(self.attention_backend, h.device))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, labels: (b, s). Labels are already shifted (label[t] is the token after input[t])."""
        h = self.hidden_states(input_ids)
        weight = self.output_weight
        if labels is None:
            return h @ weight.t().to(h.dtype)  # (b, s, vocab)
        return linear_cross_entropy(h.flatten(0, 1), weight.to(h.dtype), labels.flatten(), self.loss_chunk_size)
