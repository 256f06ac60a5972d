"""The launcher's death as a stop signal.

DeepSpeed's local launcher is two processes (``deepspeed`` → ``deepspeed.launcher.launch`` → ranks) and forwards
signals only under pdsh: ``kill -TERM <deepspeed pid>`` (what ``docker stop`` or a scheduler sends) ends the
``deepspeed`` process at once and leaves the ranks training on, unsaved. So each rank watches its launcher
processes — its parent and the ancestors above it that are launchers too — and treats the death of any of them
like SIGTERM: save and exit.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

LAUNCHER_MARKERS = (b"deepspeed", b"torch.distributed.run", b"torchrun")


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of ``pid`` from /proc, or None once it is gone. The start time tells a process
    from a later one that reuses its pid."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), fields[19]


def _is_launcher(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return any(m in cmdline for m in LAUNCHER_MARKERS)


def launcher_processes() -> list[tuple[int, str]]:
    """(pid, start time) of the launcher chain above this rank: the parent, when a launcher started us (it set
    ``LOCAL_RANK``), and each ancestor above it that is a launcher. Empty for a plain ``python -m`` run, so that a
    shell exiting under ``nohup`` does not stop training."""
    if "LOCAL_RANK" not in os.environ or not Path("/proc/self/stat").exists():
        return []
    chain, pid = [], os.getppid()
    while pid > 1:
        stat = _stat(pid)
        if stat is None or (chain and not _is_launcher(pid)):
            break
        chain.append((pid, stat[1]))
        pid = stat[0]
    return chain


def watch_launcher(on_death: Callable[[str], None], interval: float = 1.0) -> None:
    """Call ``on_death(reason)`` once, from a daemon thread, when a process of the launcher chain ends."""
    chain = launcher_processes()
    if not chain:
        return

    def poll() -> None:
        stop = threading.Event()
        while not stop.wait(interval):
            for pid, started in chain:
                stat = _stat(pid)
                if stat is None or stat[1] != started:
                    on_death(f"launcher pid {pid} exited")
                    return

    threading.Thread(target=poll, name="launcher-watch", daemon=True).start()
