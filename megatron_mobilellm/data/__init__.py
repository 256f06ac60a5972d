"""Megatron-format token datasets: reading, writing, preprocessing, splitting, blending and rank-aware sampling."""
