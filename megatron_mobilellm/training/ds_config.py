"""DeepSpeed config: read the user's JSON, fill what the CLI decides, and refuse contradictions.

Batch sizes, gradient clipping and precision come from the command line (one source of truth, Megatron's flags).
A config may leave them out or set them to ``"auto"``; if it sets them to anything else, the value must agree.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_mobilellm.errors import ConfigError


# Sections DeepSpeed reads as JSON objects; a bare value there (``"bf16": true``) would fail deep inside it.
_SECTIONS = ("bf16", "fp16", "zero_optimization", "checkpoint", "activation_checkpointing", "flops_profiler")


def _load(path: str) -> dict:
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--deepspeed_config {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"the DeepSpeed config is a folder, not a JSON file (--deepspeed_config {path})") from None
    except OSError as e:
        raise ConfigError(f"the DeepSpeed config cannot be read: {e.strerror} (--deepspeed_config {path})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--deepspeed_config {path}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"the DeepSpeed config must be a JSON object, not a {type(config).__name__} "
                          f"(--deepspeed_config {path})")
    for key in _SECTIONS:
        if key in config and not isinstance(config[key], dict):
            raise ConfigError(f"\"{key}\" must be a section (a JSON object), not {json.dumps(config[key])} "
                              f"(--deepspeed_config {path})")
    return config


def _agree(config: dict, key: str, value, path: str, flag: str) -> None:
    if key in config and config[key] != "auto" and config[key] != value:
        raise ConfigError(f"--deepspeed_config {path}: {key} = {config[key]!r} disagrees with {flag} ({value!r}); "
                          f"remove it or set it to \"auto\"")
    config[key] = value


def build_ds_config(path: str, micro_batch_size: int, grad_accum: int, world_size: int, clip_grad: float,
                    bf16: bool) -> dict:
    config = _load(path)
    _agree(config, "train_micro_batch_size_per_gpu", micro_batch_size, path, "--micro-batch-size")
    _agree(config, "gradient_accumulation_steps", grad_accum, path, "--global-batch-size / (micro × DP)")
    _agree(config, "train_batch_size", micro_batch_size * grad_accum * world_size, path, "--global-batch-size")
    _agree(config, "gradient_clipping", clip_grad, path, "--clip-grad")
    bf16_section = config.setdefault("bf16", {})
    if bf16_section.get("enabled", "auto") not in ("auto", bf16):
        raise ConfigError(f"--deepspeed_config {path}: bf16.enabled = {bf16_section['enabled']!r} disagrees with the "
                          f"command line's precision ({'bf16' if bf16 else 'fp32'}; --bf16/--fp32, default bf16 on "
                          "GPU and fp32 on CPU)")
    bf16_section["enabled"] = bf16
    if config.get("fp16", {}).get("enabled") is True:
        raise ConfigError(f"--deepspeed_config {path}: fp16 is not supported (MobileLLM trains in bf16)")
    if "optimizer" in config or "scheduler" in config:
        raise ConfigError(f"--deepspeed_config {path}: leave out 'optimizer'/'scheduler'; the trainer builds them "
                          "from --lr, --weight-decay, --adam-*, --lr-decay-style")
    config.setdefault("steps_per_print", 10**9)  # our own logger reports
    config.setdefault("zero_allow_untested_optimizer", True)
    return config
