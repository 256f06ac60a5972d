"""Checkpoints through the DeepSpeed engine, plus the state that makes a resume exact.

The files are described in ``checkpoint_layout.py``. Client state: iteration, consumed samples, the model config
and the parsed command line. The LR scheduler is saved by DeepSpeed itself. Weights are loaded by DeepSpeed; every
file, DeepSpeed's reads included, goes through ``safe_load`` (no arbitrary objects are unpickled). ``--load`` on an imported checkpoint initialises
the weights and starts at iteration 0 with a fresh optimizer, as does ``--finetune`` on a training checkpoint.
"""

from __future__ import annotations

import errno
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

from megatron_mobilellm.atomic import atomic_directory
from megatron_mobilellm.checkpoint_layout import (LATEST, MODEL_CONFIG_FILE, has_checkpoint, is_imported,
                                                  iteration_tags, latest_tag, read_checkpoint, read_imported_weights,
                                                  read_manifest, read_model_config, tag_for, tag_iteration,
                                                  verify_manifest, write_latest, write_manifest)
from megatron_mobilellm.config import ModelConfig
from megatron_mobilellm.errors import CheckpointError, ConfigError
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


def _prune(save_dir: Path, keep_last: int | None, saved: str) -> None:
    """Keep the newest ``keep_last`` complete checkpoints up to the one just saved, ranked by iteration; never the
    tag ``latest`` names or the one just saved."""
    if not keep_last:
        return
    protected = {saved, latest_tag(save_dir)}
    complete = [t for t in iteration_tags(save_dir)
                if tag_iteration(t) <= tag_iteration(saved) and verify_manifest(save_dir / t) is None]
    for tag in complete[keep_last:]:
        if tag not in protected:
            shutil.rmtree(save_dir / tag, ignore_errors=True)
            shutil.rmtree(save_dir / f"{tag}_universal", ignore_errors=True)


def check_save_dir(save_dir: str) -> None:
    """Fail at start-up, not at the first save hours later, when ``--save`` cannot be written (read-only mount,
    permissions, a file in the way). Nothing is created: the nearest existing folder must accept new entries."""
    path = Path(save_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--save {save_dir} exists and is not a directory")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only(existing) else "permission denied"
        raise ConfigError(f"--save {save_dir} is not writable ({reason} at {existing})")


def _read_only(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def _write_failure(e: Exception, tag_dir: Path) -> str | None:
    """A one-line cause for a failed save, when it is the disk's (full, read-only, not permitted), else None.
    torch's C++ writer reports these only as ``basic_ios::clear: iostream error``, so without an errno the
    filesystem is asked."""
    code = e.errno if isinstance(e, OSError) else None
    if code is None and tag_dir.parent.exists():
        if _read_only(tag_dir.parent):
            code = errno.EROFS
        elif shutil.disk_usage(tag_dir.parent).free < 1 << 20:
            code = errno.ENOSPC
        elif not os.access(tag_dir.parent, os.W_OK):
            code = errno.EACCES
    if code not in WRITE_ERRNOS:
        return None
    return f"cannot save checkpoint {tag_dir}: {os.strerror(code)}"


def save_checkpoint(engine, save_dir: str, state: TrainState, cfg: ModelConfig, cli_args: dict,
                    keep_last: int | None) -> str:
    """Save, then commit: ``manifest.json`` and ``latest`` are written by rank 0 only after every rank finished, so
    an interrupted save is never what ``--load`` picks. ``keep_last`` prunes older complete checkpoints. A save
    that fails for want of disk space or permission removes what it wrote and stops every rank with one line."""
    tag = tag_for(state.iteration)
    rank = dist.get_rank()
    tag_dir = Path(save_dir) / tag
    if rank == 0 and tag_dir.exists() and verify_manifest(tag_dir) is not None:
        shutil.rmtree(tag_dir)  # leftovers of an interrupted save of the same iteration
    fresh = not tag_dir.exists()
    dist.barrier()
    problem = None
    try:
        tag_dir.mkdir(parents=True, exist_ok=True)
        torch.save(_to_weights_only(rng_state()), tag_dir / f"rng_state_rank{rank}.pt")
        if rank == 0:
            cfg.save(tag_dir / MODEL_CONFIG_FILE)
        client = {"train_state": asdict(state), "model_config": cfg.to_dict(), "args": cli_args,
                  # lets deepspeed.checkpoint.ds_to_universal reshape it for another data-parallel size
                  "universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
        engine.save_checkpoint(save_dir, tag=tag, client_state=client, save_latest=False)
        _test_save_delay(state.iteration)
    except Exception as e:
        problem = _write_failure(e, tag_dir)
        if problem is None:
            raise
    problems: list = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    if any(problems):
        if rank == 0 and fresh:
            shutil.rmtree(tag_dir, ignore_errors=True)
        latest = latest_tag(save_dir)
        raise CheckpointError(f"{next(p for p in problems if p)}; removed the partial {tag} — free space or fix "
                              f"permissions on {save_dir} (or point --save elsewhere) and relaunch; "
                              + (f"it resumes from {latest}" if latest else "no earlier checkpoint is committed"))
    if rank == 0:
        write_manifest(tag_dir, state.iteration, dist.get_world_size(), engine.zero_optimization_stage())
        write_latest(save_dir, tag)
        _prune(Path(save_dir), keep_last, tag)
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


def plan_resume(load_dir: str, world_size: int, start_over: bool = False, log=print) -> ResumePlan | None:
    """The newest complete checkpoint in ``load_dir``: the one ``latest`` names, else the newest complete one older
    than it (warning about each skipped one); tags newer than ``latest`` (a rolled-back ``latest``) are never
    candidates. None for a fresh start: no tags, or none valid and ``start_over``; else none valid is an error."""
    d = Path(load_dir)
    if not d.is_dir():
        return None
    try:
        latest = latest_tag(d)
    except CheckpointError as e:
        log(f"warning: {e}; looking for the newest complete checkpoint instead")
        latest = None
    older = [t for t in iteration_tags(d) if latest is None or (t != latest and _older(t, latest))]
    candidates = ([latest] if latest else []) + older
    reasons = []
    for tag in candidates:
        reason = verify_manifest(d / tag) if (d / tag).is_dir() else "no such tag directory"
        if reason is None:
            manifest = read_manifest(d / tag)
            universal = manifest["world_size"] != world_size and manifest["zero_stage"] > 0
            return ResumePlan(tag, manifest, universal)
        log(f"warning: skipping checkpoint {d / tag}: {reason}; falling back to an older one")
        reasons.append(f"{tag}: {reason}")
    if reasons and not start_over:
        raise CheckpointError(f"--load {load_dir}: no checkpoint there is complete ({'; '.join(reasons)}); repair "
                              f"one, point --load elsewhere, or pass --override-invalid-checkpoints to start from "
                              f"scratch (nothing is deleted)")
    if reasons:
        log(f"warning: no complete checkpoint in {load_dir}; starting from scratch (--override-invalid-checkpoints)")
    return None


def _older(tag: str, latest: str) -> bool:
    return not re.fullmatch(r"iter_\d+", latest) or tag_iteration(tag) < tag_iteration(latest)


def set_aside_newer(save_dir: str, start: int, keep: str | None, log=print) -> None:
    """Rename (never delete, never resume) the tags in ``save_dir`` at or past the iteration this run starts from,
    other than ``keep`` (the one resumed): the abandoned future of a rolled-back ``latest``, or the tags of a run
    started over. This run's saves then never collide with them, and retention never counts them."""
    d = Path(save_dir)
    if not d.is_dir():
        return
    latest = latest_tag(d)
    for tag in iteration_tags(d):
        if tag_iteration(tag) < start or tag == keep:
            continue
        names = (tag, f"{tag}_universal") + ((LATEST,) if tag == latest else ())
        n = 1
        while any((d / f"{name}.set-aside-{n}").exists() for name in names):
            n += 1
        for name in names:
            if (d / name).exists():
                (d / name).rename(d / f"{name}.set-aside-{n}")
        log(f"warning: set aside {d / tag} as {tag}.set-aside-{n} (at or past iteration {start}, where this run "
            f"starts); rename it back to use it")


def decide_resume(load_dir: str | None, save_dir: str | None, finetune: bool, start_over: bool,
                  log=print) -> ResumePlan | None:
    """One resume decision for every rank: rank 0 plans (reads ``latest``, validates, sets aside newer tags in
    ``save_dir``) and broadcasts; each rank then checks that it sees the same checkpoint. A failure anywhere is
    raised on every rank, so no rank waits on a collective the others never reach."""
    world = dist.get_world_size()
    decision: list = [None]
    if dist.get_rank() == 0:
        try:
            plan = plan_resume(load_dir, world, start_over, log) if load_dir and not finetune else None
            if finetune and save_dir and has_checkpoint(save_dir) and _same_dir(save_dir, load_dir):
                raise ConfigError(f"--finetune with --save {save_dir} = --load would mix two runs' checkpoints; "
                                  f"save the fine-tuned run elsewhere")
            if save_dir:
                same = plan is not None and _same_dir(save_dir, load_dir)
                set_aside_newer(save_dir, plan.manifest["iteration"] if plan else 0, plan.tag if same else None, log)
            decision = [{"plan": asdict(plan) if plan else None}]
        except (CheckpointError, ConfigError, OSError) as e:
            decision = [{"error": str(e)}]
    dist.broadcast_object_list(decision, src=0)
    if "error" in decision[0]:
        raise CheckpointError(decision[0]["error"])
    plan = ResumePlan(**decision[0]["plan"]) if decision[0]["plan"] else None
    mine = None
    if plan is not None:
        reason = verify_manifest(Path(load_dir) / plan.tag)
        if reason is None and read_manifest(Path(load_dir) / plan.tag) != plan.manifest:
            reason = "its manifest differs from rank 0's"
        mine = f"rank {dist.get_rank()} cannot follow rank 0's resume from {plan.tag}: {reason}" if reason else None
    _raise_if_any_rank(mine)
    return plan


def _same_dir(a: str, b: str | None) -> bool:
    return b is not None and Path(a).resolve() == Path(b).resolve()


def _raise_if_any_rank(problem: str | None) -> None:
    """Raise on every rank when any rank reports a problem (an all-gather, so nobody is left waiting)."""
    problems: list = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    found = [p for p in problems if p]
    if found:
        raise CheckpointError("; ".join(found))


def check_resume(load_dir: str, plan: ResumePlan, cfg: ModelConfig, zero_stage: int) -> None:
    """Refuse a resume DeepSpeed would fail on with a long traceback, before it loads anything: another model
    config (a tensor size mismatch), or a ZeRO stage switch its checkpoint files cannot follow (0 ↔ 1/2 ↔ 3;
    1 ↔ 2 share one optimizer layout)."""
    saved_cfg = read_model_config(load_dir, plan.tag)
    if saved_cfg != cfg:
        changed = ", ".join(f"{k} {v} → {getattr(cfg, k)}" for k, v in saved_cfg.to_dict().items()
                            if getattr(cfg, k) != v)
        raise ConfigError(f"checkpoint {plan.tag} holds another model ({changed}); use its --model-size and "
                          f"model flags, or another --load (--load {load_dir})")
    saved_stage = plan.manifest["zero_stage"]
    if saved_stage != zero_stage and {saved_stage, zero_stage} != {1, 2}:
        raise ConfigError(f"checkpoint {plan.tag} was saved under ZeRO-{saved_stage}, this run uses "
                          f"ZeRO-{zero_stage}, and DeepSpeed cannot carry the optimizer state across that switch; "
                          f"resume with a ZeRO-{saved_stage} --deepspeed_config, or take only the weights with "
                          f"--finetune (--load {load_dir})")


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
    state = TrainState(**client["train_state"])
    iterations: list = [None] * dist.get_world_size()
    dist.all_gather_object(iterations, state.iteration)
    _raise_if_any_rank(None if len(set(iterations)) == 1 else
                       f"--load {load_dir}: ranks resumed at different iterations {iterations} from {plan.load_tag}")
    return state


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
