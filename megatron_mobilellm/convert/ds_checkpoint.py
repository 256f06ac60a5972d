"""Read a checkpoint our trainer wrote: find the tag, read its model config, consolidate fp32 weights.

Consolidation uses DeepSpeed's own ``zero_to_fp32`` (ZeRO 1–3, any data-parallel size, on CPU, no process group).
Without ZeRO partitions (stage 0) the weights are the module's own, read from ``mp_rank_00_model_states.pt`` with
``torch.load(weights_only=True)``. ``zero_to_fp32`` unpickles DeepSpeed's optimizer files, so only convert
checkpoints you trust (as with any pickle-based format).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from megatron_mobilellm.config import ModelConfig
from megatron_mobilellm.training.checkpointing import MODEL_CONFIG_FILE, tag_for

MODEL_STATES = "mp_rank_00_model_states.pt"  # ZeRO-3 names it zero_pp_rank_{R}_mp_rank_00_model_states.pt


def _model_states_files(tag_dir: Path) -> list[Path]:
    return sorted(tag_dir.glob("*model_states.pt"))


class CheckpointError(ValueError):
    """A checkpoint directory, tag or file that cannot be read; the message names it."""


def available_tags(checkpoint_dir: Path) -> list[str]:
    return sorted(p.name for p in checkpoint_dir.iterdir() if p.is_dir() and _model_states_files(p))


def resolve_tag(checkpoint_dir: str | Path, tag: str | None = None, iteration: int | None = None) -> str:
    """The tag to read: ``--tag``, ``--iteration N`` or the one named in ``latest``."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        raise CheckpointError(f"--checkpoint {d}: no such directory")
    if iteration is not None:
        tag = tag_for(iteration)
    if tag is None:
        latest = d / "latest"
        if not latest.is_file():
            raise CheckpointError(f"--checkpoint {d}: not a DeepSpeed checkpoint directory (no 'latest' file); "
                                  f"tags found: {available_tags(d) or 'none'}")
        tag = latest.read_text().strip()
    if not (d / tag).is_dir() or not _model_states_files(d / tag):
        raise CheckpointError(f"--checkpoint {d}: no checkpoint with tag {tag!r} "
                              f"(available: {', '.join(available_tags(d)) or 'none'})")
    return tag


def read_model_config(checkpoint_dir: str | Path, tag: str) -> ModelConfig:
    path = Path(checkpoint_dir) / tag / MODEL_CONFIG_FILE
    if path.is_file():
        return ModelConfig.load(path)
    states = _load_model_states(_model_states_files(Path(checkpoint_dir) / tag)[0])
    if "model_config" not in states:
        raise CheckpointError(f"{path.parent}: no model config (not written by megatron_mobilellm?)")
    return ModelConfig.from_dict(states["model_config"])


def _load_model_states(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


def consolidate(checkpoint_dir: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of the model at ``tag``."""
    d = Path(checkpoint_dir)
    if not list((d / tag).glob("*optim_states.pt")):  # ZeRO stage 0: the module file holds full weights
        states = _load_model_states(d / tag / MODEL_STATES)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per file
            state = get_fp32_state_dict_from_zero_checkpoint(str(d), tag=tag)
    except Exception as e:
        raise CheckpointError(f"{d / tag}: DeepSpeed could not consolidate the checkpoint "
                              f"({type(e).__name__}: {e}); is a shard truncated or missing?") from None
    return {k: v.float() for k, v in state.items()}


