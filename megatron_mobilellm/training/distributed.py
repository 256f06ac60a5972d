"""The process group: joining the one a launcher describes (or a world of one), and the few collectives the loop
uses to agree across ranks."""

from __future__ import annotations

import logging
import os
import socket

import torch
import torch.distributed as dist


def init_distributed() -> torch.device:
    """Join the process group the launcher describes; a plain ``python -m`` run becomes a world of one."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)  # our own log lines say what matters
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return device


def all_ranks_mean(value: torch.Tensor) -> float:
    value = value.detach().float().clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def rank0_print(text: str) -> None:
    """Print on the launcher's rank 0; usable before the process group exists."""
    if os.environ.get("RANK", "0") == "0":
        print(text, flush=True)
