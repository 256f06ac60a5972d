"""Shared test helpers: small learnable datasets and launching the trainer in subprocesses."""

from __future__ import annotations

import ast
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_mobilellm.data.indexed_dataset import IndexedDatasetWriter

ROOT = Path(__file__).resolve().parents[1]


def make_corpus(prefix: Path, num_docs: int = 300, vocab: int = 512, seed: int = 0) -> Path:
    """Documents that are arithmetic progressions modulo the vocabulary: easy to learn, so loss falls fast."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for _ in range(num_docs):
            start, step, n = rng.integers(0, vocab), rng.integers(1, 4), rng.integers(20, 200)
            w.add_document((start + np.arange(n) * step) % vocab)
    return prefix


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(available: bool, reason: str) -> None:
    """Skip a test whose optional system facility is missing, with a one-line reason — except under ``CI=true``,
    where ``.ci/run`` installs every one of them, so a missing one fails instead of being skipped silently."""
    if available:
        return
    if in_ci():
        pytest.fail(f"{reason}; under CI=true .ci/run must provide it", pytrace=False)
    pytest.skip(f"{reason}; .ci/run provides it", allow_module_level=True)  # also at a test module's top


def require_tools(*tools: str) -> None:
    """``require`` for executables: names looked up on PATH, or absolute paths (e.g. /usr/sbin/sshd)."""
    missing = [t for t in tools if not (shutil.which(t) or (os.path.isabs(t) and os.access(t, os.X_OK)))]
    require(not missing, f"needs {' and '.join(missing)}, not installed")


def fake_slurm(bin_dir: Path, submitted: str = "") -> None:
    """Stand-ins to put on PATH: ``scontrol`` expanding a three-node list (gpu-a..c) and naming the submitted
    script as SLURM does, and a ``deepspeed`` that writes where and with what it was started to $LAUNCH_RECORD."""
    bin_dir.mkdir()
    scontrol = ("#!/bin/sh\ncase \"$2\" in\n  hostnames) printf 'gpu-a\\ngpu-b\\ngpu-c\\n' ;;\n"
                f"  job) printf '   JobId=42 JobName=mobilellm\\n   Command={submitted} 350M\\n' ;;\nesac\n")
    deepspeed = '#!/bin/sh\npwd > "$LAUNCH_RECORD"\nprintf \'%s\\n\' "$@" >> "$LAUNCH_RECORD"\n'
    for name, text in (("scontrol", scontrol), ("deepspeed", deepspeed)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)


def setup_keyword(name: str):
    """A literal argument of setup.py's ``setup()`` call, read from its source (running setup.py under pytest
    clashes with the distutils that imported libraries have already loaded)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return ast.literal_eval(next(k.value for k in call.keywords if k.arg == name))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
         "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def trainer_env(args: list[str]) -> dict[str, str]:
    """``env()`` for launching the trainer with ``args``. A run without ``--compile`` compiles nothing, yet
    DeepSpeed's ZeRO optimizer imports its Muon module, whose ``torch.compile`` decorators import Inductor: ~2 s of
    start-up per rank, over a hundred ranks per suite. TORCHDYNAMO_DISABLE=1 makes those decorators no-ops (losses
    unchanged); runs that compile keep Dynamo."""
    return env() if "--compile" in args else {**env(), "TORCHDYNAMO_DISABLE": "1"}


def run_tool(name: str, *args, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python tools/<name> args...`` as a user runs it (own process, the repository as working directory)."""
    res = subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, args)], capture_output=True,
                         text=True, env=env(), timeout=timeout, cwd=ROOT)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def tiny_args(data: Path, workdir: Path, iters: int = 20, zero: int = 2, **overrides) -> list[str]:
    args = {"--model-size": "tiny", "--data-path": str(data), "--seq-length": "64", "--micro-batch-size": "2",
            "--global-batch-size": "8", "--train-iters": str(iters), "--lr": "3e-3", "--lr-warmup-iters": "2",
            "--deepspeed_config": str(ROOT / "ds_configs" / f"zero{zero}.json"), "--log-interval": "1",
            "--eval-interval": "10", "--eval-iters": "1", "--num-workers": "0", "--seed": "7",
            "--data-cache-path": str(workdir / "index_cache")}
    args.update({k: str(v) for k, v in overrides.items() if v is not None})
    flat = []
    for k, v in args.items():
        flat += [k, *v.split()] if v != "" else [k]
    return flat


def pretrain_cmd(args: list[str], nproc: int = 1) -> list[str]:
    """The trainer as a user starts it: plain ``python -m`` for one rank, under ``torchrun`` for more."""
    if nproc == 1:
        return [sys.executable, "-m", "megatron_mobilellm.pretrain", *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
            "-m", "megatron_mobilellm.pretrain", *args]


def run_pretrain(args: list[str], nproc: int = 1, timeout: int = 600, check: bool = True,
                 cwd: Path | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run(pretrain_cmd(args, nproc), capture_output=True, text=True, env=trainer_env(args),
                         timeout=timeout, cwd=cwd or ROOT)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def read_scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of a TensorBoard run, read back with tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def logged_losses(stdout: str) -> dict[int, float]:
    out = {}
    for line in stdout.splitlines():
        if line.startswith(" iteration") and "lm loss" in line:
            it = int(line.split("|")[0].split()[1].split("/")[0])
            out[it] = float(line.split("lm loss")[1].split("|")[0])
    return out
