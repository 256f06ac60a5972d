"""Checkpoints through the DeepSpeed engine, plus the state that makes a resume exact.

Layout (DeepSpeed's, one tag per save)::

    SAVE/latest                                   tag of the newest checkpoint (written by DeepSpeed)
    SAVE/iter_0000100/mp_rank_00_model_states.pt  module weights + client state (below)
    SAVE/iter_0000100/*optim_states.pt            optimizer partitions (one per rank under ZeRO)
    SAVE/iter_0000100/rng_state_rank{R}.pt        every rank's RNG states (ours)
    SAVE/iter_0000100/model_config.json           the model config, readable without loading tensors (ours)

Client state: iteration, consumed samples, the model config and the full argument namespace. The LR scheduler is
saved by DeepSpeed itself. Weights are loaded by DeepSpeed; our own small files are read with
``torch.load(weights_only=True)``.

An *imported* checkpoint (``tools/convert_hf_to_checkpoint.py``) is just ``model_config.json`` + ``model.safetensors``
in our names: ``--load`` on it initialises the weights and starts at iteration 0 with a fresh optimizer, as does
``--finetune`` on a training checkpoint.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_mobilellm.config import ModelConfig
from megatron_mobilellm.training.arguments import ConfigError


MODEL_CONFIG_FILE = "model_config.json"
IMPORTED_WEIGHTS = "model.safetensors"


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _to_weights_only(state: dict) -> dict:
    """Python's and numpy's RNG states as tensors/lists, so the file loads with ``weights_only=True``."""
    version, inner, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    out = {"python": [version, torch.tensor(inner, dtype=torch.int64), gauss], "torch": state["torch"],
           "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if "cuda" in state:
        out["cuda"] = state["cuda"]
    return out


def set_rng_state(saved: dict) -> None:
    version, inner, gauss = saved["python"]
    random.setstate((version, tuple(inner.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(saved["torch"])
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda"])


def save_checkpoint(engine, save_dir: str, state: TrainState, cfg: ModelConfig, args: argparse.Namespace) -> str:
    tag = tag_for(state.iteration)
    rank = dist.get_rank()
    tag_dir = Path(save_dir) / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    torch.save(_to_weights_only(rng_state()), tag_dir / f"rng_state_rank{rank}.pt")
    if rank == 0:
        cfg.save(tag_dir / MODEL_CONFIG_FILE)
    client = {"train_state": asdict(state), "model_config": cfg.to_dict(), "args": vars(args)}
    engine.save_checkpoint(save_dir, tag=tag, client_state=client)
    return str(tag_dir)


def has_checkpoint(load_dir: str) -> bool:
    return (Path(load_dir) / "latest").is_file()


def load_checkpoint(engine, load_dir: str, cfg: ModelConfig) -> TrainState | None:
    """Resume from ``load_dir/latest``; None if there is no checkpoint yet (a fresh start)."""
    if not has_checkpoint(load_dir):
        return None
    path, client = engine.load_checkpoint(load_dir)
    if path is None:
        raise ConfigError(f"--load {load_dir}: DeepSpeed could not load the checkpoint named in {load_dir}/latest")
    saved_cfg = ModelConfig.from_dict(client["model_config"])
    if saved_cfg != cfg:
        raise ConfigError(f"--load {load_dir}: checkpoint model config {saved_cfg} differs from this run's {cfg}")
    rng_file = Path(path).parent / f"rng_state_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return TrainState(**client["train_state"])


def write_imported_weights(output: str | Path, state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """An imported checkpoint directory, written atomically."""
    from safetensors.torch import save_file

    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise ValueError(f"--output {output} exists and is not empty")
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / IMPORTED_WEIGHTS))
        cfg.save(tmp / MODEL_CONFIG_FILE)
        if output.exists():
            output.rmdir()
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def initial_weights(load_dir: str, cfg: ModelConfig, finetune: bool) -> dict[str, torch.Tensor] | None:
    """Weights to start from instead of a full resume: an imported checkpoint, or ``--finetune`` of a training
    checkpoint (consolidated on CPU). None when ``--load`` means a full resume or a fresh start."""
    d = Path(load_dir)
    if (d / IMPORTED_WEIGHTS).is_file() and not has_checkpoint(load_dir):
        from safetensors.torch import load_file

        saved = ModelConfig.load(d / MODEL_CONFIG_FILE)
        if saved != cfg:
            raise ConfigError(f"--load {load_dir}: imported model config {saved} differs from this run's {cfg}")
        return load_file(str(d / IMPORTED_WEIGHTS))
    if finetune:
        from megatron_mobilellm.convert.ds_checkpoint import consolidate, read_model_config, resolve_tag

        tag = resolve_tag(load_dir)
        saved = read_model_config(load_dir, tag)
        if saved != cfg:
            raise ConfigError(f"--load {load_dir}: checkpoint model config {saved} differs from this run's {cfg}")
        return consolidate(load_dir, tag)
    return None
