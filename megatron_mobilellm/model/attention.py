"""Grouped-query self-attention with RoPE and selectable attention kernels.

``linear_qkv`` is one fused projection laid out per query group as Megatron does: for each KV group, that group's
query heads, then its key head, then its value head. Query head ``h`` belongs to group ``h // (heads / groups)``,
which is the same pairing transformers' ``repeat_kv`` uses, so weights map across without permuting heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_mobilellm.config import ModelConfig
from megatron_mobilellm.errors import ConfigError
from megatron_mobilellm.model import fa4

try:  # optional accelerator; PyTorch's SDPA is the default path
    from flash_attn import flash_attn_func

    FLASH_ATTN_AVAILABLE = True
except ImportError:
    flash_attn_func = None
    FLASH_ATTN_AVAILABLE = False

BACKENDS = ("auto", "flash_attn", "fa4", "cudnn", "sdpa", "eager")
# Kernels that take (b, s, heads, d): RoPE writes that layout for them directly instead of a transposed copy.
SEQUENCE_MAJOR = ("flash_attn", "fa4")


def check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``auto`` to the fastest kernel usable on ``device``; reject unusable explicit choices."""
    check_backend_name(backend)
    if backend == "flash_attn" and not FLASH_ATTN_AVAILABLE:
        raise ConfigError("the flash_attn package does not import (--attention-backend flash_attn)")
    if backend == "fa4" and not fa4.AVAILABLE:
        raise ConfigError("flash-attn-4 (flash_attn.cute) does not import; pip install '.[fa4]' "
                          "(--attention-backend fa4)")
    if backend == "fa4" and (device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9):
        raise ConfigError("FlashAttention-4 needs a Hopper or newer CUDA device (--attention-backend fa4)")
    if backend == "cudnn" and device.type != "cuda":
        raise ConfigError("cuDNN attention needs a CUDA device (--attention-backend cudnn)")
    if backend == "auto":
        if device.type != "cuda":
            return "sdpa"
        # cuDNN's fused attention measured ~1.5x FlashAttention-2 (SDPA's default pick) for head_dim 64 with GQA
        # on H200; flash_attn, when installed, is preferred only if cuDNN attention is unavailable. fa4 is only
        # ever an explicit choice (see docs/performance.md for how it measured).
        if _cudnn_attention_available():
            return "cudnn"
        return "flash_attn" if FLASH_ATTN_AVAILABLE else "sdpa"
    return backend


def _cudnn_attention_available() -> bool:
    return torch.backends.cudnn.is_available() and hasattr(torch.nn.attention.SDPBackend, "CUDNN_ATTENTION")


class RotaryEmbedding(nn.Module):
    """RoPE tables (rotate-half convention), computed in fp32 once per length/device/dtype and cached.

    The model computes them outside any compiled region and passes them to every layer (as Megatron passes
    ``rotary_pos_emb``): inside a compiled graph the tables would be recomputed per element with ``pow``/``sin``/
    ``cos`` in every layer (measured ~16 ms of a 142 ms 125M step on H200). Kept out of the state dict and built
    lazily so the model can be created on the meta device.
    """

    def __init__(self, dim: int, base: float):
        super().__init__()
        self.dim, self.base = dim, base
        self._cache: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (seq_len, device, dtype)
        if self._cache is None or self._cache[0] != key:
            exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim
            inv_freq = 1.0 / (self.base ** exponents)
            freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)  # (s, dim)
            self._cache = (key, emb.cos().to(dtype), emb.sin().to(dtype))
        return self._cache[1], self._cache[2]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (b, heads, s, d) with cos/sin (s, d), or x: (b, s, heads, d) with cos/sin (s, 1, d)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The plain causal softmax attention; the reference every kernel is tested against. (b, h, s, d) layout."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = q.shape[2]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return probs @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Causal GQA attention. q: (b, heads, s, d), k/v: (b, groups, s, d) → (b, s, heads * d)."""
    b, _, s, _ = q.shape
    if backend in SEQUENCE_MAJOR:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (b, s, h, d)
        out = flash_attn_func(q, k, v, causal=True) if backend == "flash_attn" else fa4.flash_attention_4(q, k, v)
        return out.reshape(b, s, -1)
    if backend == "cudnn":
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION], set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    elif backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    elif backend == "eager":
        out = eager_attention(q, k, v)
    else:
        raise ValueError(f"attention backend {backend!r} is not resolved")
    return out.transpose(1, 2).reshape(b, s, -1)


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_groups = config.num_query_groups
        self.head_dim = config.kv_channels
        qkv_out = config.query_projection_size + 2 * config.kv_projection_size
        self.linear_qkv = nn.Linear(config.hidden_size, qkv_out, bias=False)
        self.linear_proj = nn.Linear(config.query_projection_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rotary_pos_emb: tuple[torch.Tensor, torch.Tensor],
                attention_backend: str) -> torch.Tensor:
        """x: (b, s, d); rotary_pos_emb: the (cos, sin) tables; attention_backend: a resolved kernel name."""
        b, s, _ = x.shape
        per_group = self.num_heads // self.num_groups
        qkv = self.linear_qkv(x).view(b, s, self.num_groups, per_group + 2, self.head_dim)
        q = qkv[:, :, :, :per_group].reshape(b, s, self.num_heads, self.head_dim)  # (b, s, h, d)
        k, v = qkv[:, :, :, per_group], qkv[:, :, :, per_group + 1]  # (b, s, g, d)
        cos, sin = rotary_pos_emb
        if attention_backend in SEQUENCE_MAJOR:  # rotate in (b, s, h, d); attention() gets (b, h, s, d) views
            q, k = apply_rotary(q, cos[:, None], sin[:, None]), apply_rotary(k, cos[:, None], sin[:, None])
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.contiguous().transpose(1, 2)
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2).contiguous()
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.linear_proj(attention(q, k, v, attention_backend))
