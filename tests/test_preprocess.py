"""tools/preprocess_jsonl.py: node layout, worker determinism, bad input, skipping, text mode, and faults: the JSON
fast path against the slow one, a dying pool, Ctrl-C, disk full, unwritable outputs, odd and unreadable inputs."""

import errno
import gzip
import importlib.util
import io
import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_mobilellm.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter
from helpers import require

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "preprocess_jsonl.py"


def run_tool(*args, check=True):
    res = subprocess.run([sys.executable, str(TOOL), "--no-progress", *map(str, args)], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    if check:
        assert res.returncode == 0, res.stderr
    return res


def write_jsonl(path: Path, docs, extra=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for d in docs:
            obj = {"token_ids": [int(t) for t in d]}
            if extra:
                obj["source"] = "wiki[1]"  # a key with brackets, as amber rows carry extra keys
            f.write(json.dumps(obj) + "\n")


@pytest.fixture
def node_layout(tmp_path):
    rng = np.random.default_rng(0)
    docs = {}
    # Paths chosen so that sorted order differs from creation order.
    for node, shard in [(2, "b"), (1, "b"), (1, "a"), (10, "a")]:
        d = [rng.integers(0, 32000, size=rng.integers(1, 200)) for _ in range(30)]
        write_jsonl(tmp_path / "base" / str(node) / f"{shard}.jsonl", d)
        docs[f"{node}/{shard}"] = d
    order = ["1/a", "1/b", "10/a", "2/b"]  # sorted by path
    return tmp_path / "base", [d for key in order for d in docs[key]]


def test_node_layout_converts_in_path_order(node_layout, tmp_path):
    base, expected = node_layout
    res = run_tool("--input", base, "--output-prefix", tmp_path / "out")
    ds = IndexedDataset(tmp_path / "out")
    assert len(ds) == len(expected)
    for i, d in enumerate(expected):
        assert np.array_equal(ds[i], d)
    assert "documents 120" in res.stdout and "skipped 0" in res.stdout


def test_workers_give_byte_identical_output(node_layout, tmp_path):
    base, _ = node_layout
    run_tool("--input", base, "--output-prefix", tmp_path / "w1", "--workers", 1)
    run_tool("--input", base, "--output-prefix", tmp_path / "w2", "--workers", 2, "--chunk-size-mb", 0.01)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()


def test_globs_and_gzip(tmp_path):
    write_jsonl(tmp_path / "x1.jsonl", [[1, 2, 3]])
    with gzip.open(tmp_path / "x2.jsonl.gz", "wt") as f:
        f.write(json.dumps({"token_ids": [4, 5]}) + "\n")
    run_tool("--input", tmp_path / "x*.jsonl*", "--output-prefix", tmp_path / "o")
    ds = IndexedDataset(tmp_path / "o")
    assert [ds[i].tolist() for i in range(2)] == [[1, 2, 3], [4, 5]]


BAD_LINES = {
    "malformed": ('{"token_ids": [1, 2', "malformed JSON"),
    "missing_key": ('{"ids": [1, 2]}', "missing key 'token_ids'"),
    "non_integer": ('{"token_ids": [1, 2.5]}', "is not an integer"),
    "string_id": ('{"token_ids": [1, "7"]}', "is not an integer"),
    "negative": ('{"token_ids": [1, -3]}', "outside [0, 32000)"),
    "too_large": ('{"token_ids": [1, 32000]}', "outside [0, 32000)"),
    "overflow": ('{"token_ids": [1, 99999999999999999999999]}', "token_ids[1] = "),
    "empty_line": ("", "empty line"),
    "empty_list": ('{"token_ids": []}', "is empty"),
    "not_object": ("[1, 2, 3]", "expected a JSON object"),
    "space_in_number": ('{"token_ids": [1 2]}', "malformed JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_input_names_file_and_line_and_leaves_nothing(tmp_path, case):
    line, reason = BAD_LINES[case]
    path = tmp_path / "in" / "data.jsonl"
    path.parent.mkdir()
    path.write_text('{"token_ids": [1, 2]}\n{"token_ids": [3]}\n' + line + "\n" + '{"token_ids": [4]}\n')
    res = run_tool("--input", path, "--output-prefix", tmp_path / "out" / "x", check=False)
    assert res.returncode != 0
    assert f"{path}:3:" in res.stderr
    assert reason in res.stderr
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_truncated_last_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"token_ids": [1, 2]}\n{"token_ids": [3, 4')
    res = run_tool("--input", path, "--output-prefix", tmp_path / "x", check=False)
    assert res.returncode != 0 and f"{path}:2: malformed JSON" in res.stderr
    assert not list(tmp_path.glob("x*"))


def test_skip_bad_lines_counts_and_lists(tmp_path):
    path = tmp_path / "s.jsonl"
    lines = ['{"token_ids": [1]}', "oops", '{"token_ids": [2, 3]}', '{"token_ids": [-1]}', "",
             '{"token_ids": [4]}']
    path.write_text("\n".join(lines) + "\n")
    res = run_tool("--input", path, "--output-prefix", tmp_path / "x", "--skip-bad-lines")
    assert "skipped 3" in res.stdout
    for n in (2, 4, 5):
        assert f"{path}:{n}:" in res.stdout
    ds = IndexedDataset(tmp_path / "x")
    assert [ds[i].tolist() for i in range(len(ds))] == [[1], [2, 3], [4]]


def test_vocab_size_chooses_dtype(tmp_path):
    write_jsonl(tmp_path / "v.jsonl", [[70000, 1]])
    run_tool("--input", tmp_path / "v.jsonl", "--output-prefix", tmp_path / "big", "--vocab-size", 128000)
    assert IndexedDataset(tmp_path / "big").dtype == np.int32
    assert IndexedDataset(tmp_path / "big")[0].tolist() == [70000, 1]


def test_missing_input_is_a_clear_error(tmp_path):
    res = run_tool("--input", tmp_path / "nothing*.jsonl", "--output-prefix", tmp_path / "x", check=False)
    assert res.returncode != 0 and "no such file" in res.stderr


def test_text_mode_with_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    texts = ["hello lazy fox", "the dog"]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    run_tool("--input", tmp_path / "t.jsonl", "--output-prefix", tmp_path / "tx", "--tokenizer-model",
             tmp_path / "sp.model", "--json-key", "text", "--append-eos", "--prepend-bos")
    ds = IndexedDataset(tmp_path / "tx")
    for i, t in enumerate(texts):
        assert ds[i].tolist() == [1] + sp.encode(t) + [2]


def _generated_lines(n: int, seed: int = 0) -> list[bytes]:
    """JSON-ish lines mixing valid token_ids rows with every trap a byte-level fast path can fall into."""
    rng = np.random.default_rng(seed)
    ints = ["0", "1", "31999", "32000", "-3", "007", "00", "99999999999999999999999", "1.0", "1e3", "true", "null",
            '"7"', "[1]", "{}", "12 34", ""]
    seps = [",", ", ", " , ", ",\t", ",\r", ",,"]

    def array() -> str:
        if rng.random() < 0.6:  # clean, in one of the layouts JSON writers produce
            sep = str(rng.choice(seps[:-1]))
            return "[" + sep.join(str(v) for v in rng.integers(0, 32000, rng.integers(1, 20))) + "]"
        items = [str(rng.choice(ints)) if rng.random() < 0.3 else str(rng.integers(0, 32000))
                 for _ in range(rng.integers(0, 6))]
        body = "".join(item + (str(rng.choice(seps)) if j + 1 < len(items) else "") for j, item in enumerate(items))
        return "[" + rng.choice(["", " ", "\t"]) + body + rng.choice(["", " ", ",", "\r"]) + "]"

    keys = ['"token_ids"', '"token\\u005fids"', '"Token_ids"', '"token_ids "']
    others = ['"source": "web"', '"text": "caf\u00e9 \u65e5\u672c \\"token_ids\\": [1]"', '"n": 1.5', '"ok": true',
              '"x": null', '"token_ids": []', '"token_ids": [5]', '"meta": {"token_ids": ' + "[1, 2]" + "}",
              '"list": [[1], {"a": "]"}]', '"s": "[1, 2]"']
    lines = []
    for _ in range(n):
        fields = [f"{rng.choice(keys) if rng.random() < 0.15 else keys[0]}{rng.choice([':', ': ', ' : '])}{array()}"]
        fields += [str(rng.choice(others)) for _ in range(rng.integers(0, 3))]
        rng.shuffle(fields)
        text = "{" + ", ".join(fields) + "}"
        r = rng.random()
        if r < 0.05:
            text = "\ufeff" + text
        elif r < 0.1:
            text = text[: rng.integers(1, len(text))]  # truncated
        elif r < 0.15:
            text = "[" + text + "]"
        elif r < 0.2:
            text = "  " + text + " x"
        raw = text.encode()
        if rng.random() < 0.03:
            raw = raw.replace(b"web", b"w\xffb")  # invalid UTF-8
        lines.append(raw + rng.choice([b"\n", b"\r\n", b""]))
    return lines


def _slow(line: bytes):
    from megatron_mobilellm.data.preprocess import BadLine, parse_ids_slow
    try:
        return parse_ids_slow(line, "token_ids", 32000).tolist()
    except BadLine as e:
        return f"error: {e}"


def test_fast_and_slow_json_paths_agree_on_every_line():
    """The full per-line decision (fast path, its digit check, slow fallback) equals the orjson path alone."""
    from megatron_mobilellm.data.preprocess import Chunk, Options, parse_ids_fast, process_chunk
    lines = _generated_lines(3000)
    accepted_fast = 0
    for i, line in enumerate(lines):
        expected = _slow(line)
        res = process_chunk(Chunk("f.jsonl", 1, [line], len(line)), Options())
        got = f"error: {res.bad[0][2]}" if res.bad else res.tokens.tolist()
        assert got == expected, (i, line)
        accepted_fast += parse_ids_fast(line, b'"token_ids"', 32000) is not None
    assert 0.2 * len(lines) < accepted_fast < 0.9 * len(lines)  # both paths were exercised
    # Whole chunks (digit check once per chunk, then line by line when it fails) with skipping: same documents.
    res = process_chunk(Chunk("f.jsonl", 1, lines, 0), Options(skip_bad_lines=True))
    expected = [_slow(line) for line in lines]
    assert [b[1] - 1 for b in res.bad] == [i for i, e in enumerate(expected) if isinstance(e, str)]
    assert [b[2] for b in res.bad] == [e[len("error: "):] for e in expected if isinstance(e, str)]
    good = [e for e in expected if not isinstance(e, str)]
    assert res.lengths.tolist() == [len(d) for d in good]
    assert res.tokens.tolist() == [t for d in good for t in d]


@pytest.mark.parametrize("line, reason", [
    ('{"meta": {"token_ids": [1]}, "token_ids": []}', "is empty"),
    ('{"token_ids": [1], "token_ids": []}', "is empty"),
    ('{"token_ids": [1, 007]}', "malformed JSON"),
    ('{"token\\u005fids": [3], "x": {"token_ids": [1]}}', "[3]"),
    ('{"token_ids": [1, 2 3]}', "malformed JSON"),
    ('\ufeff{"token_ids": [1]}', "malformed JSON"),
])
def test_fast_path_traps(line, reason):
    """Lines a byte-level fast path used to misread: nested or duplicate keys, leading zeros, escaped keys."""
    from megatron_mobilellm.data.preprocess import Chunk, Options, process_chunk
    raw = line.encode()
    res = process_chunk(Chunk("f.jsonl", 1, [raw], len(raw)), Options())
    assert (res.bad[0][2] if res.bad else str(res.tokens.tolist())).find(reason) >= 0, res


# --- the worker pool under faults: a worker killed, the main process killed, Ctrl-C ---------------------------------

def _long_input(path: Path) -> Path:
    """A .jsonl.gz that reads in a moment but takes minutes to parse (5 GB of rows in 6 MB of gzip members), so the
    tool is mid-run whenever a test strikes, however fast or loaded the machine."""
    row = json.dumps({"token_ids": [5] * 2049, "source": "web"}) + "\n"
    path.write_bytes(gzip.compress((row * 1600).encode(), compresslevel=9) * 500)
    return path


@pytest.fixture
def launch(tmp_path):
    """Starts the tool (``launch(workers, *flags)``) on a long input, writing to ``out/x`` where an old dataset
    stands; returns once its workers, if any, are parsing. Whatever is left of it is killed at the end."""
    import psutil
    procs = []

    def start(workers: int, *args: str, script: str | None = None):
        out = tmp_path / "out"
        out.mkdir()
        (out / "x.bin").write_bytes(b"old")  # an existing dataset at the prefix must survive every failure
        (out / "x.idx").write_bytes(b"old")
        argv = ["--no-progress", "--input", str(_long_input(tmp_path / "in.jsonl.gz")), "--output-prefix",
                str(out / "x"), "--workers", str(workers), *args]
        # faulthandler: a hang's stacks on SIGABRT (_exit_of). Ctrl-C as from a terminal, even where pytest itself
        # runs with it ignored (nohup, `cmd &`), which the tool would inherit.
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            proc = subprocess.Popen([sys.executable, *(["-c", script] if script else [str(TOOL)]), *argv], cwd=ROOT,
                                    env={**os.environ, "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)
        finally:
            signal.signal(signal.SIGINT, previous)
        procs.append(proc)
        expected = workers if workers > 1 else 0
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None and (
                len(psutil.Process(proc.pid).children()) < expected or not list(out.glob(".x.bin.tmp*"))):
            time.sleep(0.05)
        children = psutil.Process(proc.pid).children() if proc.poll() is None else None
        if children is None or len(children) != expected:
            pytest.fail(f"the run did not get going: {proc.communicate(timeout=10)}")
        time.sleep(0.3)  # mid-run: chunks are being parsed
        return proc, children, out

    yield start
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()


def _exit_of(proc: subprocess.Popen, timeout: float = 10.0) -> str:
    """The tool's stderr once it exits; if it is still running ``timeout`` s after the fault (it should take well
    under a second), the test fails at once with the stacks of its threads: what a hang needs to be understood."""
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        pytest.fail(f"hung: still running {timeout} s after the fault; its threads:\n"
                    f"{proc.communicate(timeout=10)[1]}")


def _assert_untouched(out: Path):
    assert sorted(p.name for p in out.iterdir()) == ["x.bin", "x.idx"]
    assert (out / "x.bin").read_bytes() == (out / "x.idx").read_bytes() == b"old"


def _gone(procs, timeout=10.0) -> bool:
    import psutil
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return all(p.status() == psutil.STATUS_ZOMBIE for p in alive)


def _assert_worker_died(proc: subprocess.Popen, stderr: str, tmp_path: Path):
    assert proc.returncode == 1, stderr
    assert stderr.count("\n") == 1 and stderr.startswith(f"error: {tmp_path / 'in.jsonl.gz'}:"), stderr
    assert "a worker process died parsing the chunk from this line" in stderr


def test_killed_worker_fails_fast_names_input_and_cleans_up(launch, tmp_path):
    """What the OOM killer does to a worker: the main process must not hang, and must say which input it was."""
    proc, workers, out = launch(2, "--chunk-size-mb", "1")
    workers[0].kill()
    _assert_worker_died(proc, _exit_of(proc), tmp_path)
    _assert_untouched(out)
    assert _gone(workers)


# Kills the first worker to send a result half-way through sending it (what made ProcessPoolExecutor hang: the
# dead worker left a half-read message and the result pipe's lock held), then runs the tool as usual.
_DIES_MID_RESULT = """
import os, runpy, signal, sys
from multiprocessing.connection import Connection

main_pid, send_bytes = os.getpid(), Connection._send_bytes
marker = os.path.join(os.path.dirname(sys.argv[sys.argv.index("--input") + 1]), "died")

def send_half_and_die(self, buf):
    if os.getpid() != main_pid and len(buf) > 1 << 20:  # a worker's result
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:  # another worker got there first
            return send_bytes(self, buf)
        self._send(len(buf).to_bytes(4, "big") + bytes(buf[:len(buf) // 2]))
        os.kill(os.getpid(), signal.SIGKILL)
    return send_bytes(self, buf)

Connection._send_bytes = send_half_and_die
sys.argv[0] = "tools/preprocess_jsonl.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_worker_killed_while_sending_its_result(launch, tmp_path):
    proc, workers, out = launch(2, "--chunk-size-mb", "4", script=_DIES_MID_RESULT)
    _assert_worker_died(proc, _exit_of(proc), tmp_path)
    _assert_untouched(out)
    assert _gone(workers)


def test_killed_main_process_takes_its_workers_along(launch, tmp_path):
    """kill -9 of the main process: no orphaned workers; its temporaries go with the next run at that prefix."""
    proc, workers, out = launch(2)
    proc.kill()
    proc.wait(timeout=10)
    assert _gone(workers, timeout=10), [w.pid for w in workers]
    assert list(out.glob(".x.bin.tmp-*"))
    run_tool("--input", _docs_jsonl(tmp_path / "small.jsonl", 2), "--output-prefix", out / "x")
    assert sorted(p.name for p in out.iterdir()) == ["x.bin", "x.idx"]


@pytest.mark.parametrize("sig, to, workers", [(signal.SIGINT, "group", 2), (signal.SIGTERM, "main", 2),
                                              (signal.SIGTERM, "group", 2), (signal.SIGINT, "group", 1)])
def test_ctrl_c_and_sigterm_exit_cleanly(launch, sig, to, workers):
    """Ctrl-C reaches the whole process group (as from a terminal), SIGTERM the main process (as from a scheduler or
    docker stop) or the group (as from ``timeout``). Each way: a prompt exit with one line, nothing written, no
    temporaries, no workers left."""
    proc, workers, out = launch(workers)
    if to == "group":
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    stderr = _exit_of(proc)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == [f"error: interrupted; nothing written ({out / 'x'})"]
    _assert_untouched(out)
    assert _gone(workers)


def _square_or_die(x: int) -> int:
    if x == 7:
        os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does
    time.sleep(0.002 * (x % 3))  # uneven work: results are ready out of order
    return x * x


def test_worker_pool_keeps_input_order_and_names_what_a_dead_worker_held():
    import multiprocessing

    from megatron_mobilellm.data.worker_pool import WorkerDied, imap_ordered
    assert list(imap_ordered(abs, range(0, -60, -1), 3)) == list(range(60))
    assert list(imap_ordered(_square_or_die, range(7), 3)) == [x * x for x in range(7)]
    with pytest.raises(WorkerDied) as died:
        list(imap_ordered(_square_or_die, range(60), 3))
    assert died.value.item == 7  # not an earlier item of that worker whose result was sent but not yet read
    assert multiprocessing.active_children() == []


def test_worker_exception_reaches_the_caller_and_no_worker_is_left(tmp_path, monkeypatch):
    """A bug in parsing (not bad input) raised in a worker is raised in the main process, saying where it was."""
    import multiprocessing

    import megatron_mobilellm.data.preprocess as preprocess_module

    def parse_or_fail(chunk, opts):
        if chunk.first_line > 1:
            raise ZeroDivisionError("a bug")
        return process_chunk(chunk, opts)

    process_chunk = preprocess_module.process_chunk
    monkeypatch.setattr(preprocess_module, "process_chunk", parse_or_fail)  # the forked workers inherit it
    with pytest.raises(ZeroDivisionError, match="a bug") as raised:
        preprocess_module.preprocess([str(_docs_jsonl(tmp_path / "in.jsonl", 50))], str(tmp_path / "x"),
                                     preprocess_module.Options(), workers=2, chunk_bytes=20_000, progress=False)
    notes = "".join(raised.value.__notes__)
    assert notes.startswith("raised in a worker process:") and "in parse_or_fail" in notes
    assert multiprocessing.active_children() == []
    assert list(tmp_path.iterdir()) == [tmp_path / "in.jsonl"]


# --- the file system under faults: disk full, read-only, folders in the way, unreadable or odd inputs -------------

def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _docs_jsonl(path: Path, num_docs: int, tokens: int = 1000) -> Path:
    write_jsonl(path, [np.arange(tokens) % 32000 for _ in range(num_docs)], extra=False)
    return path


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (the real disk-full path: the kernel's ENOSPC, on write or on flush)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    require(res.returncode == 0, f"needs a tmpfs mount (root or CAP_SYS_ADMIN): {res.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def _old_dataset(prefix: Path) -> dict[str, bytes]:
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        w.add_document(np.arange(10))
    return {p.name: p.read_bytes() for p in prefix.parent.iterdir()}


@pytest.mark.parametrize("tool", ["preprocess", "preprocess-2-workers", "merge"])
def test_disk_full_on_tmpfs_is_one_line_and_keeps_old_dataset(tmp_path, small_tmpfs, tool):
    before = _old_dataset(small_tmpfs / "x")
    if tool.startswith("preprocess"):
        workers = "2" if tool.endswith("workers") else "1"
        res = run_tool("--input", _docs_jsonl(tmp_path / "in.jsonl", 1500), "--output-prefix", small_tmpfs / "x",
                       "--workers", workers, "--chunk-size-mb", "0.25", check=False)
    else:
        write_jsonl(tmp_path / "a.jsonl", [np.arange(1000)] * 1500, extra=False)
        run_tool("--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "a")
        res = subprocess.run([sys.executable, str(ROOT / "tools" / "merge_datasets.py"), "--no-progress", "--input",
                              tmp_path / "a", tmp_path / "a", "--output-prefix", small_tmpfs / "x"],
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: cannot write: no space left on device")
    assert str(small_tmpfs / "x.") in res.stderr
    assert {p.name: p.read_bytes() for p in small_tmpfs.iterdir()} == before  # no temporaries, old dataset intact
    assert shutil.disk_usage(small_tmpfs).used < 64 << 10


# Runs a tool (the second argument) that sends itself SIGTERM right after its first call of ``os.<first argument>``:
# fsync, the last step before the commit, or replace, the commit's first rename (the new .bin in place, not the .idx).
_STOP_AFTER = """
import os, runpy, signal, sys
name = sys.argv.pop(1)
call = getattr(os, name)

def call_and_stop(*args):
    call(*args)
    os.kill(os.getpid(), signal.SIGTERM)

setattr(os, name, call_and_stop)
sys.argv[0] = sys.argv.pop(1)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("tool", ["preprocess_jsonl", "merge_datasets"])
@pytest.mark.parametrize("when", ["fsync", "replace"])
def test_sigterm_during_the_commit_never_leaves_half_a_dataset(tmp_path, tool, when):
    """SIGTERM (docker stop) as the output is renamed into place: the prefix holds the whole old dataset or the whole
    new one, never a new .bin beside the old .idx, and the one line says which."""
    src = _docs_jsonl(tmp_path / "in.jsonl", 3, tokens=10)
    run_tool("--input", src, "--output-prefix", tmp_path / "a")
    inputs = [src] if tool == "preprocess_jsonl" else [tmp_path / "a", tmp_path / "a"]
    out = tmp_path / "out"
    before = _old_dataset(out / "x")
    res = subprocess.run([sys.executable, "-c", _STOP_AFTER, when, str(ROOT / "tools" / f"{tool}.py"),
                          "--no-progress", "--input", *map(str, inputs), "--output-prefix", str(out / "x")],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    done = "nothing written" if when == "fsync" else "already written in full"
    assert (res.returncode, res.stderr) == (130, f"error: interrupted; {done} ({out / 'x'})\n")
    if when == "fsync":
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    else:
        assert sorted(p.name for p in out.iterdir()) == ["x.bin", "x.idx"]
        ds = IndexedDataset(out / "x")
        assert [ds[i].tolist() for i in range(len(ds))] == [list(range(10))] * 3 * len(inputs)


@pytest.mark.parametrize("where", ["bin", "idx", "fsync"])
def test_fake_disk_full_at_each_write(tmp_path, monkeypatch, capsys, where):
    """ENOSPC raised at each write step in-process (runs everywhere, no mount needed)."""
    import megatron_mobilellm.atomic as atomic
    import megatron_mobilellm.data.indexed_dataset as indexed

    out = tmp_path / "out"
    before = _old_dataset(out / "x")
    inputs = _docs_jsonl(tmp_path / "in.jsonl", 5)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    class FullDisk(io.BufferedWriter):
        write = full

    def open_full_bin(path, mode="r", *args):
        return FullDisk(io.FileIO(path, "w")) if ".bin.tmp" in str(path) else open(path, mode, *args)

    if where == "bin":
        monkeypatch.setattr(atomic, "open", open_full_bin, raising=False)
    elif where == "idx":
        monkeypatch.setattr(indexed, "write_index", full)
    else:
        monkeypatch.setattr(os, "fsync", full)
    rc = _load_tool("preprocess_jsonl").main(["--no-progress", "--input", str(inputs), "--output-prefix",
                                              str(out / "x")])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("error: cannot write: no space left on device") and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("tool", ["preprocess", "merge"])
def test_output_path_that_is_a_folder(tmp_path, tool):
    write_jsonl(tmp_path / "in.jsonl", [[1, 2, 3]])
    run_tool("--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "src")
    (tmp_path / "out" / "x.bin").mkdir(parents=True)
    (tmp_path / "out" / "x.bin" / "keep").write_text("user data")
    cmd = ([str(TOOL), "--input", tmp_path / "in.jsonl"] if tool == "preprocess" else
           [str(ROOT / "tools" / "merge_datasets.py"), "--input", tmp_path / "src"])
    res = subprocess.run([sys.executable, *map(str, cmd), "--output-prefix", str(tmp_path / "out" / "x")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 1
    in_the_way = tmp_path / "out" / "x.bin"
    assert res.stderr == f"error: cannot write: a directory is in the way; write elsewhere ({in_the_way})\n"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x.bin"]
    assert (tmp_path / "out" / "x.bin" / "keep").read_text() == "user data"


def test_read_only_output_folder(tmp_path, small_tmpfs):
    before = _old_dataset(small_tmpfs / "x")
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    res = run_tool("--input", _docs_jsonl(tmp_path / "in.jsonl", 3), "--output-prefix", small_tmpfs / "x",
                   check=False)
    assert res.returncode == 1
    assert res.stderr == f"error: cannot write: read-only file system; write elsewhere ({small_tmpfs / 'x.bin'})\n"
    assert {p.name: p.read_bytes() for p in small_tmpfs.iterdir()} == before


@pytest.fixture
def world_dir():
    """A folder outside pytest's private tmp root, so a process that dropped root can reach it."""
    d = Path(tempfile.mkdtemp(prefix="preprocess-test-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def run_unprivileged(*args, tool: Path = TOOL) -> subprocess.CompletedProcess:
    """Run a tool where file permissions apply. Root reads everything (and CI runs as root), so as root the tool
    runs in a process that drops to nobody after importing what it needs (the interpreter may live under /root)."""
    argv = [str(tool), *map(str, args)]
    if os.geteuid() != 0:
        return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, timeout=300)
    code = ("import argparse, math, mmap, os, pkgutil, runpy, sys, tqdm, megatron_mobilellm.data.preprocess\n"
            "os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)\n"
            f"sys.argv = {argv!r}; runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("what", ["folder", "file", "output", "glob"])
def test_permission_denied(world_dir, what):
    """An unreadable node folder or file is reported as unreadable (not "has no .jsonl files", not skipped); an
    unwritable output folder as unwritable; both before any work."""
    base = world_dir / "base"
    write_jsonl(base / "1" / "a.jsonl", [[1, 2]])
    write_jsonl(base / "2" / "b.jsonl", [[3]])
    out = world_dir / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    for p in [base, base / "1", base / "2"]:
        p.chmod(0o755)
    for p in [base / "1" / "a.jsonl", base / "2" / "b.jsonl"]:
        p.chmod(0o644)
    spec = base
    if what in ("folder", "glob"):
        (base / "2").chmod(0)
        expected = f"error: cannot read {base / '2'}: permission denied\n"
        spec = base / "*" / "*.jsonl" if what == "glob" else base
    elif what == "file":
        (base / "2" / "b.jsonl").chmod(0)
        expected = f"error: cannot read {base / '2' / 'b.jsonl'}: permission denied\n"
    else:
        out.chmod(0o755)
        expected = (f"error: cannot write: permission denied; write elsewhere or fix the folder's permissions "
                    f"({out / 'x.bin'})\n")
    res = run_unprivileged("--no-progress", "--input", spec, "--output-prefix", out / "x")
    assert (res.returncode, res.stderr) == (1, expected)
    assert list(out.iterdir()) == []


def test_merge_of_an_unreadable_dataset(world_dir):
    for name in ("a", "b"):
        with IndexedDatasetWriter(world_dir / name, np.uint16) as w:
            w.add_document(np.arange(3))
        for ext in (".bin", ".idx"):
            (world_dir / f"{name}{ext}").chmod(0o644)
    (world_dir / "b.bin").chmod(0)
    out = world_dir / "out"
    out.mkdir()
    out.chmod(0o777)
    res = run_unprivileged("--input", world_dir / "a", world_dir / "b", "--output-prefix", out / "x",
                           tool=ROOT / "tools" / "merge_datasets.py")
    assert (res.returncode, res.stderr) == (1, f"error: cannot read {world_dir / 'b.bin'}: permission denied\n")
    assert list(out.iterdir()) == []


def test_symlinked_node_folders_and_files(tmp_path):
    """basepath/<node>/ built from symlinks is read; two links to one file read it once, with a warning."""
    real = tmp_path / "real"
    write_jsonl(real / "nodeA" / "a.jsonl", [[1], [2]])
    write_jsonl(real / "loose.jsonl", [[3]])
    base = tmp_path / "base"
    (base / "2").mkdir(parents=True)
    (base / "1").symlink_to(real / "nodeA", target_is_directory=True)
    (base / "2" / "b.jsonl").symlink_to(real / "loose.jsonl")
    (base / "3").symlink_to(real / "nodeA", target_is_directory=True)  # the same folder again
    res = run_tool("--input", base, "--output-prefix", tmp_path / "o")
    ds = IndexedDataset(tmp_path / "o")
    assert [ds[i].tolist() for i in range(len(ds))] == [[1], [2], [3]]
    assert "warning: 1 input path(s) lead to a file already read" in res.stderr
    assert f"{base / '3'} is {base / '1'}" in res.stderr


@pytest.mark.parametrize("spec", ["{base}", "{base}/**/*.jsonl"])
def test_symlink_loop_reads_each_file_once(tmp_path, spec):
    base = tmp_path / "base"
    write_jsonl(base / "n1" / "a.jsonl", [[1, 2]])
    write_jsonl(base / "n2" / "b.jsonl", [[3]])
    (base / "n1" / "loop").symlink_to(base, target_is_directory=True)
    run_tool("--input", spec.format(base=base), "--output-prefix", tmp_path / "o")
    ds = IndexedDataset(tmp_path / "o")
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2], [3]]


def test_broken_symlink_is_unreadable(tmp_path):
    write_jsonl(tmp_path / "base" / "a.jsonl", [[1]])
    (tmp_path / "base" / "b.jsonl").symlink_to(tmp_path / "gone.jsonl")
    res = run_tool("--input", tmp_path / "base", "--output-prefix", tmp_path / "o", check=False)
    assert (res.returncode, res.stderr) == (
        1, f"error: cannot read {tmp_path / 'base' / 'b.jsonl'}: no such file or directory\n")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not_gzip"])
def test_corrupt_gzip_names_the_file(tmp_path, damage):
    data = gzip.compress(b"".join(json.dumps({"token_ids": [i, i + 1]}).encode() + b"\n" for i in range(5000)))
    if damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "garbage":
        data = data[:len(data) // 2] + bytes(range(256)) * 4 + data[len(data) // 2:]
    else:
        data = b"just text\n"
    (tmp_path / "in.jsonl.gz").write_bytes(data)
    res = run_tool("--input", tmp_path / "in.jsonl.gz", "--output-prefix", tmp_path / "out" / "x", check=False)
    assert res.returncode == 1 and res.stderr.count("\n") == 1
    assert res.stderr.startswith(f"error: {tmp_path / 'in.jsonl.gz'}: corrupt gzip data after line ")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_zstd_input_and_the_extra_it_needs(tmp_path):
    require(importlib.util.find_spec("zstandard") is not None, "needs the [zstd] extra (zstandard)")
    import zstandard
    raw = b"".join(json.dumps({"token_ids": [i, 7]}).encode() + b"\n" for i in range(100))
    (tmp_path / "in.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    run_tool("--input", tmp_path / "in.jsonl.zst", "--output-prefix", tmp_path / "o")
    assert IndexedDataset(tmp_path / "o")[99].tolist() == [99, 7]
    argv = [str(TOOL), "--no-progress", "--input", str(tmp_path / "in.jsonl.zst"), "--output-prefix",
            str(tmp_path / "p")]
    hidden = (f"import runpy, sys; sys.modules['zstandard'] = None; sys.argv = {argv!r}; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", hidden], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert (res.returncode, res.stderr) == (1, "error: reading .zst input needs the zstandard package: pip install "
                                               f"'megatron-mobilellm[zstd]' ({tmp_path / 'in.jsonl.zst'})\n")
    assert not list(tmp_path.glob("p*"))


@pytest.mark.parametrize("flag, value", [("--workers", "0"), ("--workers", "-2"), ("--workers", "100000"),
                                         ("--workers", "1.5"), ("--vocab-size", "0"), ("--vocab-size", "2147483648"),
                                         ("--chunk-size-mb", "nan"), ("--chunk-size-mb", "inf"),
                                         ("--chunk-size-mb", "0"), ("--chunk-size-mb", "-4"),
                                         ("--chunk-size-mb", "1e9")])
def test_numeric_flags_are_range_checked_before_work(tmp_path, capsys, flag, value):
    tool = _load_tool("preprocess_jsonl")
    with pytest.raises(SystemExit) as stop:
        tool.main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "o"), flag, value])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.startswith("error: ") and err.endswith(f"({flag}); see --help\n"), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("pattern", ["*.jsonl", "*/*.jsonl", "**/*.jsonl", "**", "a/**", "[ab]*/x?.jsonl*",
                                     "a/*", "*/b/*", "**/b", ".h*/*", "nothing/*"])
def test_glob_matches_the_glob_module(tmp_path, monkeypatch, pattern):
    """Input globs are expanded by our own walk (to report unreadable folders and end symlink loops); on an
    ordinary tree it must match exactly what glob.glob(recursive=True) matches."""
    import glob as globmodule

    from megatron_mobilellm.data.preprocess import _glob
    for f in ["top.jsonl", "a/x1.jsonl", "a/x2.jsonl.gz", "a/b/y.jsonl", "a/b/c/z.jsonl", "ab/x3.jsonl", "a/.hid.jsonl",
              ".h/x4.jsonl", "b/b/w.txt"]:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    for spec in (pattern, str(tmp_path / pattern)):
        assert _glob(spec) == sorted({Path(m) for m in globmodule.glob(spec, recursive=True)}), spec


def test_glob_over_node_folders_skips_folders_without_jsonl(tmp_path):
    """'base/*' matches node folders and, say, a logs folder: the latter is no error, an empty match is."""
    write_jsonl(tmp_path / "base" / "n1" / "a.jsonl", [[1]])
    (tmp_path / "base" / "logs").mkdir()
    (tmp_path / "base" / "logs" / "run.txt").write_text("x")
    run_tool("--input", tmp_path / "base" / "*", "--output-prefix", tmp_path / "o")
    assert IndexedDataset(tmp_path / "o")[0].tolist() == [1]
    res = run_tool("--input", tmp_path / "base" / "l*", "--output-prefix", tmp_path / "p", check=False)
    assert (res.returncode, res.stderr) == (1, f"error: no such file, directory or glob match "
                                               f"({tmp_path / 'base' / 'l*'})\n")
