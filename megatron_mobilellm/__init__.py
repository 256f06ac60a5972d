"""megatron_mobilellm: a DeepSpeed/Megatron-style trainer for MobileLLM."""

__version__ = "0.1.0"
