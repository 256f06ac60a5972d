"""An ordered process pool that cannot hang: not on a worker's death, the main process's death, or Ctrl-C.

``imap_ordered(fn, items, workers)`` is ``map(fn, items)`` over worker processes, results in input order, at most
two items per worker in flight (so memory stays bounded on any input). Used by preprocessing; see issue 15.

Why not ``concurrent.futures.ProcessPoolExecutor``: its workers share one result pipe under one lock. A worker
killed while sending a result (the OOM killer picks the process that holds the most: one with a large result)
leaves that lock held and half a message in the pipe; the executor's thread then waits forever for the other half,
the surviving workers wait forever for the lock, and the main process waits forever for its future. Here:

- each worker has a pipe of its own each way, and every pipe end lives in exactly one process, so a worker's death
  is end-of-file on its pipes and its process sentinel fires: the main thread waits on nothing else;
- items are sent by one thread per worker, so the main thread never blocks on a worker that is busy, or itself
  blocked sending an earlier result back;
- workers ignore Ctrl-C and SIGTERM (the main process handles them, then kills the pool), and die with the main
  process (``PR_SET_PDEATHSIG``; elsewhere on end-of-file of their input pipe);
- closing the pool kills and reaps the workers: it never waits on a queue, a lock or a worker that may not finish.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import queue
import signal
import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field
from multiprocessing import get_all_start_methods, get_context
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class WorkerDied(RuntimeError):
    """A worker process died (killed: the OOM killer, kill -9) while holding ``item`` (None: it held none)."""

    def __init__(self, item: Any | None, exitcode: int | None):
        super().__init__(f"a worker process died (exit code {exitcode})")
        self.item = item


def imap_ordered(fn: Callable[[T], R], items: Iterable[T], workers: int,
                 setup: Callable[[], None] | None = None) -> Iterator[R]:
    """``fn`` over ``items`` in ``workers`` processes (each runs ``setup`` first), results in input order.

    An exception ``fn`` raises is raised here, with the worker's traceback as a note; a worker's death raises
    WorkerDied naming the item it held. Closing the generator (an error or Ctrl-C in the caller) kills the workers.
    """
    with OrderedPool(workers, fn, setup) as pool:
        for item in items:
            if pool.in_flight == 2 * workers:
                yield pool.next_result()
            pool.submit(item)
        while pool.in_flight:
            yield pool.next_result()


@dataclass
class _Worker:
    process: BaseProcess
    tasks: Connection  # main → worker; the feeder thread's once it starts (it sends, and closes it)
    results: Connection  # worker → main
    outbox: queue.SimpleQueue  # items for the feeder thread to send; None ends it
    feeder: threading.Thread
    pending: deque = field(default_factory=deque)  # sent, result not read yet; the oldest is being worked on


class OrderedPool(Generic[T, R]):
    """Worker processes that get items round-robin, so reading their results in turn gives input order."""

    def __init__(self, workers: int, fn: Callable[[T], R], setup: Callable[[], None] | None = None):
        # fork: workers start in milliseconds and need not re-import the caller's __main__.
        ctx = get_context("fork" if "fork" in get_all_start_methods() else "spawn")
        self.workers: list[_Worker] = []
        self._order: deque[_Worker] = deque()  # who holds each item in flight, in input order
        self._submitted = 0
        try:
            # Stop signals wait while a worker starts, so none reaches it before it has chosen to ignore them.
            signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            try:
                for _ in range(workers):
                    self.workers.append(self._start(ctx, fn, setup))
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            for w in self.workers:  # threads only after the last fork (a fork copies no thread but its caller)
                w.feeder.start()
        except BaseException:
            self.close()
            raise

    def _start(self, ctx, fn: Callable[[T], R], setup: Callable[[], None] | None) -> _Worker:
        task_reader, task_writer = ctx.Pipe(duplex=False)
        result_reader, result_writer = ctx.Pipe(duplex=False)
        # The child closes the copies it inherits of the main process's pipe ends (its own and earlier workers').
        main_ends = [end for w in self.workers for end in (w.tasks, w.results)] + [task_writer, result_reader]
        process = ctx.Process(target=_work, args=(task_reader, result_writer, fn, setup, os.getpid(), main_ends),
                              daemon=True)
        process.start()
        task_reader.close()
        result_writer.close()
        outbox = queue.SimpleQueue()
        return _Worker(process, task_writer, result_reader, outbox,
                       threading.Thread(target=_feed, args=(task_writer, outbox), daemon=True))

    @property
    def in_flight(self) -> int:
        return len(self._order)

    def submit(self, item: T) -> None:
        """Hand ``item`` to the next worker in turn; never blocks."""
        worker = self.workers[self._submitted % len(self.workers)]
        self._submitted += 1
        worker.pending.append(item)
        worker.outbox.put(item)
        self._order.append(worker)

    def next_result(self) -> R:
        """The oldest item's result; WorkerDied, naming the item a worker held, as soon as any worker has died."""
        worker = self._order[0]
        sentinels = {w.process.sentinel: w for w in self.workers}
        ready = wait([worker.results, *sentinels])
        dead = next((sentinels[s] for s in ready if s in sentinels), None)
        if dead is not None:
            raise self._died(dead)
        try:
            result = worker.results.recv()
        except (EOFError, OSError):  # it died mid-message, before its sentinel showed
            raise self._died(worker) from None
        self._order.popleft()
        worker.pending.popleft()
        if isinstance(result, _Failure):
            result.error.add_note(f"raised in a worker process:\n{result.traceback}")
            raise result.error
        return result

    @staticmethod
    def _died(worker: _Worker) -> WorkerDied:
        """WorkerDied naming the item ``worker`` was working on: the oldest whose result it never sent, else (it
        died idle) the last it was given, else None."""
        worker.process.join()
        item = None
        while worker.pending and worker.results.poll():  # results sent before it died; never blocks, it is gone
            try:
                worker.results.recv()
            except (EOFError, OSError):
                break
            item = worker.pending.popleft()
        return WorkerDied(worker.pending[0] if worker.pending else item, worker.process.exitcode)

    def close(self) -> None:
        """Kill the workers (they hold nothing: every result is read, or no longer wanted) and reap them; the
        feeder threads then end, on the None or on the broken pipe, and close their pipes themselves."""
        for w in self.workers:
            w.outbox.put(None)
            w.process.kill()
        for w in self.workers:
            w.process.join()
            if w.feeder.ident is None:  # never started (an error while starting the pool)
                w.tasks.close()
            else:
                w.feeder.join()
            w.results.close()

    def __enter__(self) -> OrderedPool[T, R]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class _Failure:
    """What a worker sends back instead of a result when ``fn`` raised."""
    error: Exception
    traceback: str


def _portable(error: Exception) -> Exception:
    """``error`` if it survives pickling (sending it must not fail in turn), else a RuntimeError saying what it was."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


def _feed(tasks: Connection, outbox: queue.SimpleQueue) -> None:
    """A feeder thread: sends one worker its items until told to stop or the worker is gone."""
    with tasks:
        try:
            while (item := outbox.get()) is not None:
                tasks.send(item)
        except OSError:  # the worker died; the main thread learns of it from the worker's sentinel
            pass


def _work(tasks: Connection, results: Connection, fn: Callable[[T], R], setup: Callable[[], None] | None,
          parent_pid: int, main_ends: list[Connection]) -> None:
    """A worker process: applies ``fn`` to each item that arrives and sends back the result (or the failure)."""
    for conn in main_ends:
        conn.close()
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the main process died before the line above took effect
        os._exit(1)
    if setup is not None:
        setup()
    try:
        while True:
            item = tasks.recv()
            try:
                result = fn(item)
            except Exception as e:  # a bug, MemoryError: raised in the main process, saying where it happened
                result = _Failure(_portable(e), traceback.format_exc().rstrip())
            results.send(result)
    except (EOFError, OSError):  # the main process closed our pipes: it is done, or gone
        pass
