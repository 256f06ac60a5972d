"""Our model against transformers' LlamaForCausalLM with mapped weights (fp32), and the key map's round trip."""

import pytest
import torch
import transformers

from megatron_mobilellm.config import PRESETS, ModelConfig
from megatron_mobilellm.model import MobileLLM
from megatron_mobilellm.model.hf_adapter import from_hf, hf_config_dict, to_hf


def build(cfg: ModelConfig, backend: str = "eager") -> MobileLLM:
    model = MobileLLM(cfg, attention_backend=backend)
    model.init_weights(torch.Generator().manual_seed(1))
    # Norm weights of one are a weak test of the key map: make them distinct.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def hf_model(cfg: ModelConfig, ours: MobileLLM) -> transformers.LlamaForCausalLM:
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_dict(cfg), attn_implementation="eager"))
    missing, unexpected = hf.load_state_dict(to_hf(ours.state_dict(), cfg), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    return hf.eval()


def tiny(groups_ratio: int, layer_sharing: bool, **kw) -> ModelConfig:
    heads = 2 * groups_ratio if groups_ratio > 1 else 4
    return ModelConfig(num_layers=3, hidden_size=heads * 16, ffn_hidden_size=96, num_attention_heads=heads,
                       num_query_groups=heads // groups_ratio, kv_channels=16, vocab_size=97,
                       max_position_embeddings=64, layer_sharing=layer_sharing, **kw)


def assert_parity(cfg: ModelConfig, seq: int = 24, batch: int = 2) -> None:
    ours = build(cfg)
    hf = hf_model(cfg, ours)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert (got - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("ratio", [1, 3, 4])
@pytest.mark.parametrize("layer_sharing", [False, True])
def test_logits_match_transformers_tiny(ratio, layer_sharing):
    assert_parity(tiny(ratio, layer_sharing))


def test_logits_match_transformers_untied():
    assert_parity(tiny(2, False, tie_embeddings=False))


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "tiny"])
def test_logits_match_transformers_preset_width(preset):
    cfg = ModelConfig(**{**PRESETS[preset], "num_layers": 2, "vocab_size": 1000})
    assert_parity(cfg, seq=16, batch=1)


@pytest.mark.parametrize("layer_sharing", [False, True])
def test_round_trip_is_exact(layer_sharing):
    cfg = tiny(3, layer_sharing)
    state = build(cfg).state_dict()
    back = from_hf(to_hf(state, cfg), cfg)
    assert back.keys() == state.keys()
    for k in state:
        assert torch.equal(back[k], state[k]), k


def test_ls_mapping_unrolls_to_identical_layers():
    cfg = tiny(2, True)
    hf = to_hf(build(cfg).state_dict(), cfg)
    assert sum(k.endswith("q_proj.weight") for k in hf) == 2 * cfg.num_layers
    assert torch.equal(hf["model.layers.2.mlp.up_proj.weight"], hf["model.layers.3.mlp.up_proj.weight"])
    hf["model.layers.3.mlp.up_proj.weight"] = hf["model.layers.3.mlp.up_proj.weight"] + 1
    with pytest.raises(ValueError, match="differ"):
        from_hf(hf, cfg)


def test_qkv_layout_is_grouped_per_kv_head():
    cfg = tiny(3, False)
    per_group, d, h = 3, cfg.kv_channels, cfg.hidden_size
    q = torch.arange(cfg.query_projection_size).float().unsqueeze(1).expand(-1, h)
    k = -1 - torch.arange(cfg.kv_projection_size).float().unsqueeze(1).expand(-1, h)
    v = 1000 + torch.arange(cfg.kv_projection_size).float().unsqueeze(1).expand(-1, h)
    hf = to_hf(build(cfg).state_dict(), cfg)
    hf["model.layers.0.self_attn.q_proj.weight"], hf["model.layers.0.self_attn.k_proj.weight"] = q, k
    hf["model.layers.0.self_attn.v_proj.weight"] = v
    qkv = from_hf(hf, cfg)["decoder.layers.0.self_attention.linear_qkv.weight"][:, 0]
    # Group 1 starts after group 0's 3 q heads + k + v; it holds q heads 3..5, then k head 1, then v head 1.
    g1 = qkv[(per_group + 2) * d:(per_group + 2) * 2 * d]
    assert torch.equal(g1[:per_group * d], q[per_group * d:2 * per_group * d, 0])
    assert torch.equal(g1[per_group * d:(per_group + 1) * d], k[d:2 * d, 0])
    assert torch.equal(g1[(per_group + 1) * d:], v[d:2 * d, 0])
