"""The deferred any-rank agreement the training loop uses to stop: every rank sees the same answer, one call late."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_mobilellm.training.distributed import DeferredAnyRank


def _worker(rank: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    agree = DeferredAnyRank(torch.device("cpu"))
    answers = [agree([False, False]),  # nothing to read yet
               agree([rank == 1, False]),  # returns call 1's answer
               agree([False, rank == 0]),  # call 2's: rank 1 raised flag 0
               agree([False, False])]  # call 3's: rank 0 raised flag 1
    agree.drain()
    out.put((rank, answers))
    dist.destroy_process_group()


def test_every_rank_gets_the_same_answer_one_call_late():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(rank, port, out)) for rank in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    expected = [[False, False], [False, False], [True, False], [False, True]]
    assert results == {0: expected, 1: expected}


def test_a_world_of_one_answers_at_once():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        agree = DeferredAnyRank(torch.device("cpu"))
        assert agree([True, False]) == [True, False]
        agree.drain()
    finally:
        dist.destroy_process_group()
