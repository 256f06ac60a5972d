"""Checkpoint conversion: DeepSpeed checkpoints ↔ Hugging Face directories."""
