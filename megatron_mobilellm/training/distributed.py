"""The process group: joining the one a launcher describes (or a world of one), and the few collectives the loop
uses to agree across ranks."""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import NoReturn

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


def exit_without_teardown() -> NoReturn:
    """End a rank whose work is done (outputs written, process group destroyed) with status 0, skipping the
    interpreter's teardown: there C++ threads of the distributed stack have aborted a rank after a successful run
    ("terminate called without an active exception", exit -6; about one multi-rank CPU run with gloo in a few
    hundred, also after destroy_process_group), which turns a finished job into a failed one."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def all_ranks_mean(value: torch.Tensor) -> float:
    value = value.detach().float().clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


class DeferredAnyRank:
    """Whether any rank raised each flag, without stalling the host: each call starts the all-reduce (max) of this
    iteration's flags and returns the previous call's result, so every rank acts on the same answer one iteration
    later.

    Reading an all-reduce's result at once (``.tolist()``) waits for all GPU work queued before it, so the host could
    not queue the next step while the GPU finished this one. Here the result is copied into pinned host memory behind
    the all-reduce and read one call later, after waiting only for that copy (long done by then). In a world of one
    there is nothing to agree on and the flags come back unchanged, at once.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.pending: tuple[torch.Tensor, torch.cuda.Event | None] | None = None

    def __call__(self, flags: list[bool]) -> list[bool]:
        if dist.get_world_size() == 1:
            return flags
        cuda = self.device.type == "cuda"
        local = torch.tensor([float(f) for f in flags], pin_memory=cuda)
        reduced = local.to(self.device, non_blocking=True)
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
        host = torch.empty(len(flags), pin_memory=True).copy_(reduced, non_blocking=True) if cuda else reduced
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        previous, self.pending = self.pending, (host, event)
        return self._read(previous) if previous else [False] * len(flags)

    def drain(self) -> None:
        """Wait for the last all-reduce (before the process group goes away)."""
        if self.pending:
            self._read(self.pending)
            self.pending = None

    @staticmethod
    def _read(pending: tuple[torch.Tensor, torch.cuda.Event | None]) -> list[bool]:
        host, event = pending
        if event is not None:
            event.synchronize()
        return [bool(v) for v in host.tolist()]


def rank0_print(text: str) -> None:
    """Print on the launcher's rank 0; usable before the process group exists."""
    if os.environ.get("RANK", "0") == "0":
        print(text, flush=True)
