"""Write files and directories so that readers see either nothing or the complete result.

Everything is written under a temporary name beside the target and renamed into place at the end (a rename is
atomic within a filesystem); on an error the temporary is removed.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


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


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """An open file that becomes ``path`` (flushed to disk) only when the block completes."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """A fresh temporary directory that replaces ``path`` (and whatever was there) when the block completes."""
    path = Path(path)
    tmp = _tmp_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
