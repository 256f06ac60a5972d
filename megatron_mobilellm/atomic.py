"""Write files and directories so that readers see either nothing or the complete result.

Everything is written under a temporary name beside the target and renamed into place at the end (a rename is
atomic within a filesystem); on an error the temporary is removed. Ctrl-C or SIGTERM during the renaming takes
effect once it is done, so a commit of several renames never stops half-way.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import signal
import threading
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Iterator


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_stale_temporaries(path: str | Path) -> None:
    """Remove the temporaries of ``path`` left by writers that were killed outright (kill -9, the OOM killer):
    those whose process no longer runs on this machine."""
    path = Path(path)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = tmp.name.rpartition("-")[2]
        if pid.isdigit() and not _running(int(pid)):
            tmp.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def _stop_signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM that arrive inside the block are delivered at its end, to the handlers they would have
    met: a commit must not stop between its renames (a new ``.bin`` beside the old ``.idx``, or the old directory
    deleted and the new one not yet in place)."""
    if threading.current_thread() is not threading.main_thread():  # Python runs handlers in the main thread only
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous = {sig: handler for sig, handler in previous.items() if handler is not None}  # None: not Python's
    for sig in previous:
        signal.signal(sig, lambda received, frame: caught.append(received))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in caught:
            signal.raise_signal(sig)


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """An open file that becomes ``path`` (flushed to disk) only when the block completes."""
    with atomic_files([path], mode) as (f,):
        yield f


@contextmanager
def atomic_files(paths: list[str | Path], mode: str = "wb") -> Iterator[list[IO]]:
    """Open files that appear together: all are flushed to disk before the first is renamed into place, so a full
    disk or a crash while writing leaves the previous versions of every one of them untouched."""
    paths = [Path(p) for p in paths]
    tmps = [_tmp_name(p) for p in paths]
    try:
        with ExitStack() as stack:
            files = [stack.enter_context(open(t, mode)) for t in tmps]
            yield files
            for f in files:
                f.flush()
                os.fsync(f.fileno())
        with _stop_signals_deferred():
            for tmp, path in zip(tmps, paths):
                os.replace(tmp, path)
    except BaseException:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file name that becomes ``path`` (flushed to disk) when the block completes — for writers that
    open the file themselves (the gguf library, llama.cpp's quantizer)."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_error_message(err: OSError, path: str | Path) -> str:
    """``err`` as one line for the user: what went wrong, what to do, and the final path (never the temporary)."""
    hint = {errno.ENOSPC: "no space left on device; free some space or write elsewhere",
            errno.EDQUOT: "disk quota exceeded; free some space or write elsewhere",
            errno.EACCES: "permission denied; write elsewhere or fix the folder's permissions",
            errno.EPERM: "permission denied; write elsewhere or fix the folder's permissions",
            errno.EROFS: "read-only file system; write elsewhere",
            errno.EISDIR: "a directory is in the way; write elsewhere"}
    what = hint.get(err.errno, (err.strerror or str(err)).lower())
    return f"cannot write: {what} ({path})"


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """A fresh temporary directory that replaces ``path`` (and whatever was there) when the block completes.

    The old directory is renamed aside before the new one is renamed in and deleted only after, so a kill -9 at
    any moment leaves the old or the new one in place (or the old one under its ``.old-<pid>`` name), never neither.
    """
    path = Path(path)
    tmp = _tmp_name(path)
    aside = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        with _stop_signals_deferred():
            if path.exists():
                _remove(aside)
                os.replace(path, aside)
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside.exists() and not path.exists():  # the new one did not go in: put the old one back
            os.replace(aside, path)
        raise
    _remove(aside)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
