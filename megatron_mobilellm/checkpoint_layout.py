"""What a checkpoint directory holds and how to read one back as (model config, weights), without a process group.

Layout (DeepSpeed's, one tag per save)::

    SAVE/latest                                   tag of the newest complete checkpoint (written last)
    SAVE/iter_0000100/mp_rank_00_model_states.pt  module weights + client state
    SAVE/iter_0000100/*optim_states.pt            optimizer partitions (one per rank under ZeRO)
    SAVE/iter_0000100/rng_state_rank{R}.pt        every rank's RNG states (ours)
    SAVE/iter_0000100/model_config.json           the model config, readable without loading tensors (ours)
    SAVE/iter_0000100/manifest.json               every file and its size, written after all ranks finished

An *imported* checkpoint (``tools/convert_hf_to_checkpoint.py``) is just ``model_config.json`` + ``model.safetensors``
in our names. Training (``training/checkpointing.py``) writes and resumes; the converters and tools only read, through
this module, which sits below both.

Consolidation uses DeepSpeed's own ``zero_to_fp32`` (ZeRO 1–3, any data-parallel size, on CPU). Without ZeRO
partitions (stage 0) the weights are the module's own. Every file, DeepSpeed's reads included, is loaded through
``safe_load`` (no arbitrary objects are unpickled).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import torch

from megatron_mobilellm.atomic import atomic_directory, atomic_file
from megatron_mobilellm.config import ModelConfig
from megatron_mobilellm.errors import CheckpointError
from megatron_mobilellm.safe_load import load, weights_only_loads

LATEST = "latest"
MODEL_CONFIG_FILE = "model_config.json"
MANIFEST = "manifest.json"
IMPORTED_WEIGHTS = "model.safetensors"
MODEL_STATES = "mp_rank_00_model_states.pt"  # ZeRO-3 names it zero_pp_rank_{R}_mp_rank_00_model_states.pt


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def tag_iteration(tag: str) -> int:
    return int(tag.split("_", 1)[1])


def iteration_tags(save_dir: Path) -> list[str]:
    """The ``iter_N`` tags in ``save_dir``, highest iteration first (complete or not); ranked by number, not name,
    so a tag past ``iter_9999999`` still sorts right."""
    return sorted((p.name for p in save_dir.glob("iter_*") if p.is_dir() and re.fullmatch(r"iter_\d+", p.name)),
                  key=tag_iteration, reverse=True)


def has_checkpoint(checkpoint_dir: str | Path) -> bool:
    return (Path(checkpoint_dir) / LATEST).is_file()


def latest_tag(checkpoint_dir: str | Path) -> str | None:
    """The tag ``latest`` names, or None without one; a ``latest`` that names no tag (binary, damaged) is an
    error naming it."""
    if not has_checkpoint(checkpoint_dir):
        return None
    path = Path(checkpoint_dir) / LATEST
    try:
        tag = path.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        tag = ""
    if not re.fullmatch(r"[\w.-]+", tag):
        raise CheckpointError(f"'{LATEST}' does not name a checkpoint tag (a damaged or foreign file) ({path})")
    return tag


def _write_text(path: Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def write_latest(save_dir: str | Path, tag: str) -> None:
    """Commit ``tag`` as the one to resume from (written last, atomically)."""
    _write_text(Path(save_dir) / LATEST, tag)


def write_manifest(tag_dir: Path, iteration: int, world_size: int, zero_stage: int) -> None:
    files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    _write_text(tag_dir / MANIFEST, json.dumps({"iteration": iteration, "world_size": world_size,
                                               "zero_stage": zero_stage, "files": files}, indent=1))


def read_manifest(tag_dir: Path) -> dict:
    """Iteration, world size, ZeRO stage and file sizes of a committed save (ValueError if it has not that shape)."""
    manifest = json.loads((tag_dir / MANIFEST).read_text())
    if not (isinstance(manifest, dict) and isinstance(manifest.get("files"), dict)
            and all(isinstance(manifest.get(k), int) for k in ("iteration", "world_size", "zero_stage"))):
        raise ValueError(f"{tag_dir / MANIFEST} is not a manifest")
    return manifest


def verify_manifest(tag_dir: Path) -> str | None:
    """None if the checkpoint at ``tag_dir`` is complete, else the reason it is not."""
    try:
        manifest = read_manifest(tag_dir)
    except FileNotFoundError:
        return "no manifest (the save did not complete)"
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        return "unreadable manifest"
    for name, size in manifest["files"].items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    return None


def _model_states_files(tag_dir: Path) -> list[Path]:
    return sorted(tag_dir.glob("*model_states.pt"))


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
        tag = latest_tag(d)
        if tag is None:
            raise CheckpointError(f"--checkpoint {d}: not a DeepSpeed checkpoint directory (no '{LATEST}' file); "
                                  f"tags found: {available_tags(d) or 'none'}")
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
        return load(path)
    except CheckpointError:
        raise
    except Exception as e:  # a truncated or foreign file: say which one
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


def _zero_stage(tag_dir: Path, states: dict) -> int:
    """The ZeRO stage a tag was saved with: from our manifest, else from the DeepSpeed config DeepSpeed stores."""
    if (tag_dir / MANIFEST).is_file():
        return read_manifest(tag_dir)["zero_stage"]
    return int(((states.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0))


def consolidate(checkpoint_dir: str | Path, tag: str, use_module_weights: bool = False) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of the model at ``tag``: under ZeRO the fp32 masters in the optimizer files (refusing a
    tag without them, unless ``use_module_weights`` accepts the module's, possibly bf16, copy)."""
    d = Path(checkpoint_dir)
    if not list((d / tag).glob("*optim_states.pt")):
        states = _load_model_states(d / tag / MODEL_STATES)
        if _zero_stage(d / tag, states) and not use_module_weights:
            raise CheckpointError(f"{d / tag}: a ZeRO checkpoint without its optimizer files (*optim_states.pt), "
                                  f"which hold the fp32 master weights; restore them, or pass "
                                  f"--use-module-weights to export the module's {_dtype_of(states)} weights")
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with contextlib.redirect_stdout(io.StringIO()), weights_only_loads():  # it prints a line per file
            state = get_fp32_state_dict_from_zero_checkpoint(str(d), tag=tag)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{d / tag}: DeepSpeed could not consolidate the checkpoint "
                              f"({type(e).__name__}: {e}); is a shard truncated or missing?") from None
    return {k: v.float() for k, v in state.items()}


def _dtype_of(states: dict) -> str:
    return str(next(iter(states["module"].values())).dtype).removeprefix("torch.")


def read_checkpoint(checkpoint_dir: str | Path, tag: str | None = None, iteration: int | None = None,
                    use_module_weights: bool = False) -> tuple[str, ModelConfig, dict[str, torch.Tensor]]:
    """The tag read (``latest`` unless ``tag``/``iteration`` says otherwise), its model config and fp32 weights."""
    tag = resolve_tag(checkpoint_dir, tag, iteration)
    return tag, read_model_config(checkpoint_dir, tag), consolidate(checkpoint_dir, tag, use_module_weights)


def is_imported(checkpoint_dir: str | Path) -> bool:
    """An imported checkpoint: weights and config only, no training tags."""
    return (Path(checkpoint_dir) / IMPORTED_WEIGHTS).is_file() and not has_checkpoint(checkpoint_dir)


def write_imported_weights(output: str | Path, state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """An imported checkpoint directory, written atomically."""
    from safetensors.torch import save_file

    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise CheckpointError(f"the output folder exists and is not empty (--output {output})")
    with atomic_directory(output) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / IMPORTED_WEIGHTS))
        cfg.save(tmp / MODEL_CONFIG_FILE)


def read_imported_weights(checkpoint_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    d = Path(checkpoint_dir)
    return ModelConfig.load(d / MODEL_CONFIG_FILE), load_file(str(d / IMPORTED_WEIGHTS))
