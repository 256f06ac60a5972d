"""Two-way map between our Megatron-named state dict and transformers' ``LlamaForCausalLM``.

The non-trivial parts: ``linear_qkv`` is grouped per KV group (q heads of the group, its k head, its v head) and
must be split/joined group by group, not as three contiguous blocks; ``linear_fc1`` is ``[gate; up]``; the tied
embedding appears once (``lm_head.weight`` is emitted only for untied models); and a layer-sharing model unrolls to
a plain Llama in which pass ``j`` of block ``i`` becomes HF layer ``i * repeat + j``.
"""

from __future__ import annotations

import torch

from megatron_mobilellm.config import ModelConfig

_LAYER_NORMS = {"input_layernorm.weight": "input_layernorm.weight",
                "pre_mlp_layernorm.weight": "post_attention_layernorm.weight"}


def _split_qkv(w: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    per_group = cfg.num_attention_heads // cfg.num_query_groups
    w = w.view(cfg.num_query_groups, per_group + 2, cfg.kv_channels, cfg.hidden_size)
    q = w[:, :per_group].reshape(cfg.query_projection_size, cfg.hidden_size)
    k = w[:, per_group].reshape(cfg.kv_projection_size, cfg.hidden_size)
    v = w[:, per_group + 1].reshape(cfg.kv_projection_size, cfg.hidden_size)
    return q, k, v


def _join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    per_group = cfg.num_attention_heads // cfg.num_query_groups
    g, d, h = cfg.num_query_groups, cfg.kv_channels, cfg.hidden_size
    grouped = torch.cat([q.reshape(g, per_group, d, h), k.reshape(g, 1, d, h), v.reshape(g, 1, d, h)], dim=1)
    return grouped.reshape(-1, h)


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict → ``LlamaForCausalLM`` keys (LS blocks unrolled; tensors are views, clone to own them)."""
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
           "model.norm.weight": state["decoder.final_layernorm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["output_layer.weight"]
    for i in range(cfg.num_layers):
        src = f"decoder.layers.{i}."
        q, k, v = _split_qkv(state[src + "self_attention.linear_qkv.weight"], cfg)
        gate, up = state[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        layer = {"self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v,
                 "self_attn.o_proj.weight": state[src + "self_attention.linear_proj.weight"],
                 "mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up,
                 "mlp.down_proj.weight": state[src + "mlp.linear_fc2.weight"]}
        layer.update({hf: state[src + ours] for ours, hf in _LAYER_NORMS.items()})
        for j in range(cfg.passes_per_block):
            dst = f"model.layers.{i * cfg.passes_per_block + j}."
            out.update({dst + key: t for key, t in layer.items()})
    return out


def from_hf(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """``LlamaForCausalLM`` keys → our state dict. For LS configs the HF layers of one block must be identical."""
    out = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    if not cfg.tie_embeddings:
        out["output_layer.weight"] = hf["lm_head.weight"]
    elif "lm_head.weight" in hf and not torch.equal(hf["lm_head.weight"], hf["model.embed_tokens.weight"]):
        raise ValueError("checkpoint has an lm_head different from the embedding, but the config ties them")
    for i in range(cfg.num_layers):
        first = f"model.layers.{i * cfg.passes_per_block}."
        for j in range(1, cfg.passes_per_block):
            other = f"model.layers.{i * cfg.passes_per_block + j}."
            for key in [k[len(first):] for k in hf if k.startswith(first)]:
                if not torch.equal(hf[first + key], hf[other + key]):
                    raise ValueError(f"layer-sharing config, but HF layers {first}{key} and {other}{key} differ")
        dst = f"decoder.layers.{i}."
        out[dst + "self_attention.linear_qkv.weight"] = _join_qkv(
            hf[first + "self_attn.q_proj.weight"], hf[first + "self_attn.k_proj.weight"],
            hf[first + "self_attn.v_proj.weight"], cfg)
        out[dst + "self_attention.linear_proj.weight"] = hf[first + "self_attn.o_proj.weight"]
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([hf[first + "mlp.gate_proj.weight"],
                                                        hf[first + "mlp.up_proj.weight"]], dim=0)
        out[dst + "mlp.linear_fc2.weight"] = hf[first + "mlp.down_proj.weight"]
        out.update({dst + ours: hf[first + name] for ours, name in _LAYER_NORMS.items()})
    return out


def hf_config_dict(cfg: ModelConfig, bos_token_id: int = 1, eos_token_id: int = 2) -> dict:
    """Keyword arguments for ``transformers.LlamaConfig`` describing the same function (LS unrolled)."""
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_passes, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups, head_dim=cfg.kv_channels, hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_epsilon,
        rope_theta=cfg.rotary_base, attention_bias=False, mlp_bias=False, tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_method_std, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
    )
