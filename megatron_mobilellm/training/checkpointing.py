"""Checkpoints through the DeepSpeed engine, plus the state that makes a resume exact.

Layout (DeepSpeed's, one tag per save)::

    SAVE/latest                                   tag of the newest complete checkpoint (written last)
    SAVE/iter_0000100/mp_rank_00_model_states.pt  module weights + client state (below)
    SAVE/iter_0000100/*optim_states.pt            optimizer partitions (one per rank under ZeRO)
    SAVE/iter_0000100/rng_state_rank{R}.pt        every rank's RNG states (ours)
    SAVE/iter_0000100/model_config.json           the model config, readable without loading tensors (ours)
    SAVE/iter_0000100/manifest.json               every file and its size, written after all ranks finished

Client state: iteration, consumed samples, the model config and the full argument namespace. The LR scheduler is
saved by DeepSpeed itself. Weights are loaded by DeepSpeed; our own small files are read with
``torch.load(weights_only=True)``.

An *imported* checkpoint (``tools/convert_hf_to_checkpoint.py``) is just ``model_config.json`` + ``model.safetensors``
in our names: ``--load`` on it initialises the weights and starts at iteration 0 with a fresh optimizer, as does
``--finetune`` on a training checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_mobilellm.atomic import atomic_directory, atomic_file
from megatron_mobilellm.config import ModelConfig
from megatron_mobilellm.training.arguments import ConfigError


MODEL_CONFIG_FILE = "model_config.json"
IMPORTED_WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"


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


def _test_save_delay(iteration: int) -> None:
    """Fault-injection hook for tests: ``MEGATRON_MOBILELLM_TEST_SAVE_DELAY=ITER:SECONDS`` stalls every rank after
    its files are written and before the checkpoint is committed, so a test can kill a rank mid-save."""
    spec = os.environ.get("MEGATRON_MOBILELLM_TEST_SAVE_DELAY")
    if spec and int(spec.split(":")[0]) == iteration:
        print(f"save of iteration {iteration} in progress on rank {dist.get_rank()} (pid {os.getpid()})", flush=True)
        time.sleep(float(spec.split(":")[1]))


def _write_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def write_manifest(tag_dir: Path, iteration: int, world_size: int, zero_stage: int) -> None:
    files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    _write_atomic(tag_dir / MANIFEST, json.dumps({"iteration": iteration, "world_size": world_size,
                                                  "zero_stage": zero_stage, "files": files}, indent=1))


def verify_manifest(tag_dir: Path) -> str | None:
    """None if the checkpoint at ``tag_dir`` is complete, else the reason it is not."""
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest (the save did not complete)"
    except json.JSONDecodeError:
        return "unreadable manifest"
    for name, size in manifest["files"].items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    return None


def _tags(save_dir: Path) -> list[str]:
    return sorted((p.name for p in save_dir.glob("iter_*") if p.is_dir() and re.fullmatch(r"iter_\d+", p.name)),
                  reverse=True)


def _prune(save_dir: Path, keep_last: int | None) -> None:
    complete = [t for t in _tags(save_dir) if verify_manifest(save_dir / t) is None]
    for tag in complete[keep_last:] if keep_last else []:
        shutil.rmtree(save_dir / tag, ignore_errors=True)
        shutil.rmtree(save_dir / f"{tag}_universal", ignore_errors=True)


def save_checkpoint(engine, save_dir: str, state: TrainState, cfg: ModelConfig, args: argparse.Namespace) -> str:
    """Save, then commit: ``manifest.json`` and ``latest`` are written by rank 0 only after every rank finished, so
    an interrupted save is never what ``--load`` picks. ``--keep-last N`` prunes older complete checkpoints."""
    tag = tag_for(state.iteration)
    rank = dist.get_rank()
    tag_dir = Path(save_dir) / tag
    if rank == 0 and tag_dir.exists() and verify_manifest(tag_dir) is not None:
        shutil.rmtree(tag_dir)  # leftovers of an interrupted save of the same iteration
    dist.barrier()
    tag_dir.mkdir(parents=True, exist_ok=True)
    torch.save(_to_weights_only(rng_state()), tag_dir / f"rng_state_rank{rank}.pt")
    if rank == 0:
        cfg.save(tag_dir / MODEL_CONFIG_FILE)
    client = {"train_state": asdict(state), "model_config": cfg.to_dict(), "args": vars(args),
              # lets deepspeed.checkpoint.ds_to_universal reshape it for another data-parallel size
              "universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
    engine.save_checkpoint(save_dir, tag=tag, client_state=client, save_latest=False)
    _test_save_delay(state.iteration)
    dist.barrier()
    if rank == 0:
        write_manifest(tag_dir, state.iteration, dist.get_world_size(), engine.zero_optimization_stage())
        _write_atomic(Path(save_dir) / "latest", tag)
        _prune(Path(save_dir), getattr(args, "keep_last", None))
    dist.barrier()
    return str(tag_dir)


def has_checkpoint(load_dir: str) -> bool:
    return (Path(load_dir) / "latest").is_file()


@dataclass
class ResumePlan:
    tag: str
    manifest: dict
    universal: bool  # saved with another data-parallel size under ZeRO: load DeepSpeed's universal format

    @property
    def load_tag(self) -> str:
        return f"{self.tag}_universal" if self.universal else self.tag


def plan_resume(load_dir: str, world_size: int, log=print) -> ResumePlan | None:
    """The newest complete checkpoint in ``load_dir`` (``latest`` first, then older ones, warning about each
    incomplete one), or None for a fresh start."""
    d = Path(load_dir)
    if not d.is_dir():
        return None
    latest = (d / "latest").read_text().strip() if (d / "latest").is_file() else None
    candidates = ([latest] if latest else []) + [t for t in _tags(d) if t != latest]
    for tag in candidates:
        reason = verify_manifest(d / tag)
        if reason is None:
            manifest = json.loads((d / tag / MANIFEST).read_text())
            universal = manifest["world_size"] != world_size and manifest["zero_stage"] > 0
            return ResumePlan(tag, manifest, universal)
        log(f"warning: skipping checkpoint {d / tag}: {reason}; falling back to an older one")
    return None


def prepare_universal(load_dir: str, plan: ResumePlan) -> None:
    """Convert ``plan.tag`` with DeepSpeed's ds_to_universal (rank 0; the others wait)."""
    src, dst = Path(load_dir) / plan.tag, Path(load_dir) / plan.load_tag
    if dist.get_rank() == 0 and not (dst / "zero").is_dir():
        with atomic_directory(dst) as tmp:
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
                   "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise ConfigError(f"--load {load_dir}: converting {plan.tag} (saved with "
                                  f"{plan.manifest['world_size']} ranks) for this run failed:\n{res.stderr[-2000:]}")
            for f in src.glob("rng_state_rank*.pt"):
                shutil.copy(f, tmp / f.name)
    dist.barrier()


def load_checkpoint(engine, load_dir: str, cfg: ModelConfig, plan: ResumePlan) -> TrainState:
    path, client = engine.load_checkpoint(load_dir, tag=plan.load_tag)
    if path is None:
        raise ConfigError(f"--load {load_dir}: DeepSpeed could not load checkpoint {plan.load_tag}")
    saved_cfg = ModelConfig.from_dict(client["model_config"])
    if saved_cfg != cfg:
        raise ConfigError(f"--load {load_dir}: checkpoint model config {saved_cfg} differs from this run's {cfg}")
    rng_file = Path(load_dir) / plan.load_tag / f"rng_state_rank{dist.get_rank()}.pt"
    if rng_file.is_file():  # absent for ranks that did not exist in the saving run
        set_rng_state(torch.load(rng_file, weights_only=True))
    return TrainState(**client["train_state"])


def write_imported_weights(output: str | Path, state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """An imported checkpoint directory, written atomically."""
    from safetensors.torch import save_file

    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise ValueError(f"--output {output} exists and is not empty")
    with atomic_directory(output) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / IMPORTED_WEIGHTS))
        cfg.save(tmp / MODEL_CONFIG_FILE)


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
