"""The MobileLLM model: Megatron-named decoder, kernels, loss and the transformers key map."""

from megatron_mobilellm.model.transformer import MobileLLM

__all__ = ["MobileLLM"]
