"""Checkpoints through the DeepSpeed engine, plus the state that makes a resume exact.

The files are described in ``checkpoint_layout.py``. Client state: iteration, consumed samples, the model config
and the parsed command line. The LR scheduler is saved by DeepSpeed itself. Weights are loaded by DeepSpeed; every
file, DeepSpeed's reads included, goes through ``safe_load`` (no arbitrary objects are unpickled). ``--load`` on an imported checkpoint initialises
the weights and starts at iteration 0 with a fresh optimizer, as does ``--finetune`` on a training checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_mobilellm.atomic import atomic_directory
from megatron_mobilellm.checkpoint_layout import (MODEL_CONFIG_FILE, is_imported, iteration_tags, latest_tag,
                                                  read_checkpoint, read_imported_weights, read_manifest, tag_for,
                                                  verify_manifest, write_latest, write_manifest)
from megatron_mobilellm.config import ModelConfig
from megatron_mobilellm.errors import ConfigError
from megatron_mobilellm.safe_load import load, weights_only_loads


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0


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


def _prune(save_dir: Path, keep_last: int | None) -> None:
    complete = [t for t in iteration_tags(save_dir) if verify_manifest(save_dir / t) is None]
    for tag in complete[keep_last:] if keep_last else []:
        shutil.rmtree(save_dir / tag, ignore_errors=True)
        shutil.rmtree(save_dir / f"{tag}_universal", ignore_errors=True)


def save_checkpoint(engine, save_dir: str, state: TrainState, cfg: ModelConfig, cli_args: dict,
                    keep_last: int | None) -> str:
    """Save, then commit: ``manifest.json`` and ``latest`` are written by rank 0 only after every rank finished, so
    an interrupted save is never what ``--load`` picks. ``keep_last`` prunes older complete checkpoints."""
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
    client = {"train_state": asdict(state), "model_config": cfg.to_dict(), "args": cli_args,
              # lets deepspeed.checkpoint.ds_to_universal reshape it for another data-parallel size
              "universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
    engine.save_checkpoint(save_dir, tag=tag, client_state=client, save_latest=False)
    _test_save_delay(state.iteration)
    dist.barrier()
    if rank == 0:
        write_manifest(tag_dir, state.iteration, dist.get_world_size(), engine.zero_optimization_stage())
        write_latest(save_dir, tag)
        _prune(Path(save_dir), keep_last)
    dist.barrier()
    return str(tag_dir)


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
    latest = latest_tag(d)
    candidates = ([latest] if latest else []) + [t for t in iteration_tags(d) if t != latest]
    for tag in candidates:
        reason = verify_manifest(d / tag)
        if reason is None:
            manifest = read_manifest(d / tag)
            universal = manifest["world_size"] != world_size and manifest["zero_stage"] > 0
            return ResumePlan(tag, manifest, universal)
        log(f"warning: skipping checkpoint {d / tag}: {reason}; falling back to an older one")
    return None


def prepare_universal(load_dir: str, plan: ResumePlan) -> None:
    """Convert ``plan.tag`` with DeepSpeed's ds_to_universal (rank 0; the others wait)."""
    src, dst = Path(load_dir) / plan.tag, Path(load_dir) / plan.load_tag
    if dist.get_rank() == 0 and not (dst / "zero").is_dir():
        with atomic_directory(dst) as tmp:
            cmd = [sys.executable, "-m", "megatron_mobilellm.safe_load", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
                   "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise ConfigError(f"--load {load_dir}: converting {plan.tag} (saved with "
                                  f"{plan.manifest['world_size']} ranks) for this run failed:\n{res.stderr[-2000:]}")
            for f in src.glob("rng_state_rank*.pt"):
                shutil.copy(f, tmp / f.name)
    dist.barrier()


def load_checkpoint(engine, load_dir: str, cfg: ModelConfig, plan: ResumePlan) -> TrainState:
    with weights_only_loads():
        path, client = engine.load_checkpoint(load_dir, tag=plan.load_tag)
    if path is None:
        raise ConfigError(f"--load {load_dir}: DeepSpeed could not load checkpoint {plan.load_tag}")
    saved_cfg = ModelConfig.from_dict(client["model_config"])
    if saved_cfg != cfg:
        raise ConfigError(f"--load {load_dir}: checkpoint model config {saved_cfg} differs from this run's {cfg}")
    rng_file = Path(load_dir) / plan.load_tag / f"rng_state_rank{dist.get_rank()}.pt"
    if rng_file.is_file():  # absent for ranks that did not exist in the saving run
        set_rng_state(load(rng_file))
    return TrainState(**client["train_state"])


def initial_weights(load_dir: str, cfg: ModelConfig, finetune: bool) -> dict[str, torch.Tensor] | None:
    """Weights to start from instead of a full resume: an imported checkpoint, or ``--finetune`` of a training
    checkpoint (consolidated on CPU). None when ``--load`` means a full resume or a fresh start."""
    if is_imported(load_dir):
        saved, weights = read_imported_weights(load_dir)
        if saved != cfg:
            raise ConfigError(f"--load {load_dir}: imported model config {saved} differs from this run's {cfg}")
        return weights
    if finetune:
        _, saved, weights = read_checkpoint(load_dir)
        if saved != cfg:
            raise ConfigError(f"--load {load_dir}: checkpoint model config {saved} differs from this run's {cfg}")
        return weights
    return None
