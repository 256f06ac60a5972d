"""atomic_directory: readers see the old or the new directory, never neither, whatever stops the commit."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import megatron_mobilellm.atomic as atomic
from helpers import env


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def _old(tmp_path: Path) -> Path:
    out = tmp_path / "export"
    (out / "sub").mkdir(parents=True)
    (out / "a.txt").write_text("old a")
    (out / "sub" / "b.txt").write_text("old b")
    return out


def test_replaces_the_old_directory_and_leaves_no_temporaries(tmp_path):
    out = _old(tmp_path)
    with atomic.atomic_directory(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _tree(out) == {"new.txt": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_an_error_while_writing_keeps_the_old_directory(tmp_path):
    out = _old(tmp_path)
    with pytest.raises(RuntimeError):
        with atomic.atomic_directory(out) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("disk full")
    assert _tree(out) == {"a.txt": "old a", "sub/b.txt": "old b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_failure_between_the_renames_puts_the_old_directory_back(tmp_path, monkeypatch):
    out = _old(tmp_path)
    real_replace = os.replace
    calls = []

    def replace_fails_second_time(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace_fails_second_time)
    with pytest.raises(OSError):
        with atomic.atomic_directory(out) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert _tree(out) == {"a.txt": "old a", "sub/b.txt": "old b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


KILL_AT_REPLACE = """
import os, signal, sys
from pathlib import Path
import megatron_mobilellm.atomic as atomic
real_replace, when = os.replace, sys.argv[2]
def replace_then_die(src, dst):
    if when == "after":
        real_replace(src, dst)
    os.kill(os.getpid(), signal.SIGKILL)
atomic.os.replace = replace_then_die
with atomic.atomic_directory(Path(sys.argv[1])) as tmp:
    (tmp / "new.txt").write_text("new")
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_killed_at_the_first_rename_the_old_directory_survives(tmp_path, when):
    """kill -9 runs no cleanup: the old directory must still exist, in place or aside (it used to be deleted
    before the new one was renamed in)."""
    out = _old(tmp_path)
    proc = subprocess.run([sys.executable, "-c", KILL_AT_REPLACE, str(out), when], env=env())
    assert proc.returncode == -signal.SIGKILL
    survivors = [p.name for p in tmp_path.iterdir() if _tree(p) == {"a.txt": "old a", "sub/b.txt": "old b"}]
    assert survivors, sorted(p.name for p in tmp_path.iterdir())


def test_a_file_in_the_way_is_replaced(tmp_path):
    out = tmp_path / "export"
    out.write_text("a file")
    with atomic.atomic_directory(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _tree(out) == {"new.txt": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
