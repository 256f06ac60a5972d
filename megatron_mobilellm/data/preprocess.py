"""jsonl shards (token ids or raw text) → one Megatron ``.bin/.idx`` dataset; the engine behind
``tools/preprocess_jsonl.py``.

Inputs are read in order (directories walked in sorted path order, so ``basepath/<node>/*.jsonl`` converts as laid
out) and cut into chunks of lines; chunks are parsed by a process pool and written strictly in input order, so the
output is byte-identical for any number of workers and memory is bounded by about
``2 × chunk_bytes × workers``.

Token-id lines take a fast path (``parse_ids_fast``): the ``"token_ids"`` array is located with byte searches and
parsed by numpy's C parser, and the rest of the object is validated by orjson. It only ever accepts a line that the
plain ``orjson.loads`` path (``parse_ids_slow``) accepts with the same ids; any doubt sends the line there, which
is also what produces the error messages, so both paths give the same result or the same error on every line.

Workers run under a pool that no worker's death, the main process's death or Ctrl-C can hang
(``worker_pool.imap_ordered``); every failure leaves nothing behind (see ``IndexedDatasetWriter``).
"""

from __future__ import annotations

import fnmatch
import gzip
import io
import os
import re
import stat
import sys
import time
import zlib
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import orjson
from tqdm import tqdm

from megatron_mobilellm.data.indexed_dataset import IndexedDatasetWriter, token_dtype
from megatron_mobilellm.data.worker_pool import WorkerDied, imap_ordered

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
_JSON_WS = b" \t\r\n"
_SEPARATORS = b"," + _JSON_WS
_MAGIC = re.compile(r"[*?[]")  # what makes a path component a glob pattern (as in the glob module)


class BadLine(ValueError):
    """A line that cannot become a document; the message is the reason."""


class PreprocessError(RuntimeError):
    """Input that cannot be converted: a bad line in strict mode (``file:line: reason``), an unreadable, missing or
    damaged file; the message is one line naming the file."""


@dataclass
class Options:
    json_key: str = "token_ids"
    vocab_size: int = 32000
    tokenizer_model: str | None = None
    append_eos: bool = False
    prepend_bos: bool = False
    skip_bad_lines: bool = False


@dataclass
class Chunk:
    path: str
    first_line: int
    lines: list[bytes]
    nbytes: int


@dataclass
class ChunkResult:
    tokens: np.ndarray
    lengths: np.ndarray
    bad: list[tuple[str, int, str]]
    nbytes: int


@dataclass
class Summary:
    files: int = 0
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    output_bytes: int = 0
    skipped: int = 0
    first_skipped: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    def report(self) -> str:
        mb_s = self.input_bytes / 1e6 / max(self.elapsed, 1e-9)
        lines = [f"files {self.files:,}  documents {self.documents:,}  tokens {self.tokens:,}  "
                 f"input {self.input_bytes / 1e6:,.1f} MB  output {self.output_bytes / 1e6:,.1f} MB  "
                 f"skipped {self.skipped:,}  elapsed {self.elapsed:.1f} s  ({mb_s:,.1f} MB/s)"]
        lines += [f"  skipped: {loc}" for loc in self.first_skipped]
        return "\n".join(lines)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; directories → every jsonl file below, symlinked folders included, in sorted path order;
    globs → sorted matches (folders among them walked the same way).

    Every file is checked readable here, before any work. Each real file is read once: one reached again (through
    a symlink loop, two links to it, or a repeated ``--input``) is skipped with a warning.
    """
    files: list[Path] = []
    seen: dict[tuple[int, int], Path] = {}
    repeats: list[str] = []
    for spec in inputs:
        if os.path.lexists(spec):
            found = _walk(Path(spec), repeats)
        else:
            found = [f for m in _glob(spec) for f in _walk(m, repeats, required=False)]
            if not found:
                raise PreprocessError(f"no such file, directory or glob match ({spec})")
        for f in found:
            ident = _check_readable(f)
            if ident in seen:
                if f != seen[ident]:  # the same path twice (a glob like base/** and its folders) is no news
                    repeats.append(f"{f} is {seen[ident]}")
                continue
            seen[ident] = f
            files.append(f)
    if repeats:
        print(f"warning: {len(repeats)} input path(s) lead to a file already read, skipped (e.g. {repeats[0]})",
              file=sys.stderr)
    for f in files:
        if f.name.endswith(".zst"):
            _zstandard(f)  # fails now rather than after the files before it are converted
            break
    return files


def _glob(pattern: str) -> list[Path]:
    """``glob.glob(pattern, recursive=True)``, sorted, except that an unreadable folder on the way is an error (glob
    skips it without a word) and ``**`` enters each real folder once (glob follows a symlink loop ~40 deep)."""
    parts = Path(pattern).parts
    literal = next((i for i, part in enumerate(parts) if _MAGIC.search(part)), len(parts))
    matches = [Path(*parts[:literal])] if literal else [Path()]
    for i, part in enumerate(parts[literal:], literal):
        last = i == len(parts) - 1
        found: list[Path] = []
        for base in matches:
            if part == "**":  # this folder and every one below (and, last, every file below); hidden ones not
                for folder, _, names in _walk_folders(base):
                    if not any(p.startswith(".") for p in Path(folder).relative_to(base).parts):
                        found += [Path(folder)] + [Path(folder, n) for n in names if last and not n.startswith(".")]
            elif base.is_dir():
                names = _listdir(base)
                found += [base / n for n in names if fnmatch.fnmatchcase(n, part)
                          and (part.startswith(".") or not n.startswith("."))
                          and (last or (base / n).is_dir())]
        matches = found
    return sorted({m for m in matches if m != Path() and os.path.lexists(m)})


def _listdir(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except OSError as e:
        raise PreprocessError(f"cannot read {folder}: {e.strerror.lower()}") from None


def _walk_folders(root: Path, repeats: list[str] | None = None) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk`` following symlinked folders, in sorted depth-first order, entering each real folder once (a
    repeat is noted in ``repeats``) so a symlink loop ends; an unreadable folder is a PreprocessError."""
    def unreadable(e: OSError) -> None:
        raise PreprocessError(f"cannot read {e.filename}: {e.strerror.lower()}")

    entered: dict[tuple[int, int], str] = {}
    for folder, subfolders, names in os.walk(root, followlinks=True, onerror=unreadable):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in entered:
            if repeats is not None:
                repeats.append(f"{folder} is {entered[st.st_dev, st.st_ino]}")
            subfolders.clear()
            continue
        entered[st.st_dev, st.st_ino] = folder
        subfolders.sort()  # the first path to a folder is then the first in sorted order
        yield folder, subfolders, sorted(names)


def _walk(root: Path, repeats: list[str], required: bool = True) -> list[Path]:
    """``root`` itself unless it is a folder (or a link to one); then its jsonl files in sorted path order, which
    must exist when the folder was named (``required``), rather than matched by a glob."""
    if not root.is_dir():
        return [root]
    found = [Path(f, n) for f, _, names in _walk_folders(root, repeats) for n in names if n.endswith(SUFFIXES)]
    if not found and required:
        raise PreprocessError(f"directory has no {'/'.join(SUFFIXES)} files ({root})")
    return sorted(found)


def _check_readable(path: Path) -> tuple[int, int]:
    """The file's identity (device, inode); PreprocessError if it cannot be opened for reading."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # non-blocking: a FIFO must not hang the check
    except OSError as e:
        raise PreprocessError(f"cannot read {path}: {e.strerror.lower()}") from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if stat.S_ISDIR(st.st_mode):
        raise PreprocessError(f"cannot read {path}: is a directory")
    return st.st_dev, st.st_ino


def _zstandard(path: Path):
    """The optional ``zstandard`` module, or PreprocessError naming the extra that installs it."""
    try:
        import zstandard
    except ImportError:
        raise PreprocessError("reading .zst input needs the zstandard package: "
                              f"pip install 'megatron-mobilellm[zstd]' ({path})") from None
    return zstandard


def _open(path: Path) -> tuple[io.BufferedIOBase, tuple[type[BaseException], ...]]:
    """The decompressed stream of ``path`` and the exceptions, besides OSError, that mean it is damaged."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb"), (EOFError, zlib.error)
    if path.name.endswith(".zst"):
        zstandard = _zstandard(path)
        reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return io.BufferedReader(reader), (zstandard.ZstdError,)
    return open(path, "rb"), ()


def read_chunks(files: list[Path], chunk_bytes: int) -> Iterator[Chunk]:
    for path in files:
        line_no, damaged = 1, ()
        try:
            stream, damaged = _open(path)
            with stream as f:
                while lines := f.readlines(chunk_bytes):
                    yield Chunk(str(path), line_no, lines, sum(map(len, lines)))
                    line_no += len(lines)
        except (gzip.BadGzipFile, *damaged) as e:
            kind = "zstd" if path.name.endswith(".zst") else "gzip"
            raise PreprocessError(f"{path}: corrupt {kind} data after line {line_no - 1} ({e})") from None
        except OSError as e:
            raise PreprocessError(f"cannot read {path}: {(e.strerror or str(e)).lower()}") from None


def parse_ids_fast(line: bytes, key: bytes, vocab_size: int) -> tuple[np.ndarray, int] | None:
    """``(ids, digits)`` of a plain, well-formed line, or None: then ``parse_ids_slow`` decides, and gives errors.

    Plain means: the quoted key occurs once and the line has no backslash (so no escaped spelling of the key can
    hide elsewhere, and the occurrence found is the top-level key), and the array holds only digits, commas and
    JSON whitespace, ending in a digit. The array is parsed by numpy's C parser (which raises on a missing or
    doubled comma), the rest of the object by orjson. ``digits`` counts the array's digit characters: the caller
    compares it with the ids' own digit count (``_digit_count``), which rejects leading zeros, as JSON does.
    """
    k = line.find(key)
    if k < 0 or line.find(key, k + 1) >= 0 or b"\\" in line:
        return None
    lb = line.find(b"[", k + len(key))
    if lb < 0 or line[k + len(key):lb].strip(_JSON_WS) != b":":
        return None
    rb = line.find(b"]", lb)
    if rb < 0:
        return None
    content = line[lb + 1:rb]
    digits = content.translate(None, _SEPARATORS)
    # Only digits, commas and whitespace, ending in a digit (numpy would accept a trailing comma).
    if not digits.isdigit() or not content.rstrip(_JSON_WS)[-1:].isdigit():
        return None
    try:
        ids = np.fromstring(content, dtype=np.int64, sep=",")  # raises on text it cannot read to the end
    except ValueError:
        return None
    # numpy saturates ids beyond int64 at its maximum, so the bound check catches overflow too.
    if ids.max() >= vocab_size:
        return None
    try:
        rest = orjson.loads(line[:lb + 1] + line[rb:])
    except orjson.JSONDecodeError:
        return None
    if not isinstance(rest, dict) or rest.get(key[1:-1].decode()) != []:
        return None
    return ids, len(digits)


def _digit_count(ids: np.ndarray) -> int:
    """Digits of ``ids`` written in decimal without leading zeros."""
    n, power, top = ids.size, 10, int(ids.max()) if ids.size else 0
    while power <= top:
        n += int(np.count_nonzero(ids >= power))
        power *= 10
    return n


def _value_of(line: bytes, key: str):
    """``line``'s JSON object's ``key``, or BadLine saying why there is none."""
    if not line.strip():
        raise BadLine("empty line")
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        raise BadLine(f"malformed JSON ({e})") from None
    if not isinstance(obj, dict):
        raise BadLine(f"expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise BadLine(f"missing key {key!r}")
    return obj[key]


def parse_ids_slow(line: bytes, key: str, vocab_size: int) -> np.ndarray:
    """The ids of ``line`` by the plain route (orjson), or BadLine naming the first problem."""
    ids = _value_of(line, key)
    if not isinstance(ids, list):
        raise BadLine(f"{key!r} is not a list")
    if not ids:
        raise BadLine(f"{key!r} is empty")
    for i, t in enumerate(ids):
        if not isinstance(t, int) or isinstance(t, bool):
            raise BadLine(f"{key}[{i}] = {t!r} is not an integer")
        if not 0 <= t < vocab_size:
            raise BadLine(f"{key}[{i}] = {t} is outside [0, {vocab_size}) (--vocab-size {vocab_size})")
    return np.array(ids, dtype=np.int64)


_tokenizer = None


def _init_worker(opts: Options) -> None:
    """Per-process setup (in each pool worker, or in the main process with one worker): the tokenizer."""
    global _tokenizer
    if opts.tokenizer_model:
        import sentencepiece

        _tokenizer = sentencepiece.SentencePieceProcessor(model_file=opts.tokenizer_model)


def _parse_text(line: bytes, opts: Options) -> np.ndarray:
    text = _value_of(line, opts.json_key)
    if not isinstance(text, str):
        raise BadLine(f"{opts.json_key!r} is not a string")
    ids = _tokenizer.encode(text)
    if opts.prepend_bos:
        ids = [_tokenizer.bos_id()] + ids
    if opts.append_eos:
        ids = ids + [_tokenizer.eos_id()]
    if not ids:
        raise BadLine("text tokenizes to nothing")
    return np.array(ids, dtype=np.int64)


def process_chunk(chunk: Chunk, opts: Options) -> ChunkResult:
    """Parse one chunk. Token-id lines take the fast path; its digit check runs once over the whole chunk, and only
    when that fails (an id written with leading zeros somewhere) is the chunk parsed again checking line by line."""
    return _parse_lines(chunk, opts, False) or _parse_lines(chunk, opts, True)


def _parse_lines(chunk: Chunk, opts: Options, check_each_line: bool) -> ChunkResult | None:
    docs: list[np.ndarray] = []
    bad: list[tuple[str, int, str]] = []
    key = f'"{opts.json_key}"'.encode()
    digits = 0  # digit characters of the token_ids arrays, to compare with the ids' own
    for i, line in enumerate(chunk.lines):
        try:
            if opts.tokenizer_model:
                ids = _parse_text(line, opts)
            else:
                fast = parse_ids_fast(line, key, opts.vocab_size)
                if fast is not None and check_each_line and fast[1] != _digit_count(fast[0]):
                    fast = None
                ids, n = fast or (parse_ids_slow(line, opts.json_key, opts.vocab_size), None)
                digits += _digit_count(ids) if n is None else n
        except BadLine as e:
            bad.append((chunk.path, chunk.first_line + i, str(e)))
            if not opts.skip_bad_lines:
                break
            continue
        docs.append(ids)
    # Ids are already bounds-checked; shipping them in the output dtype cuts the transfer from workers 4x.
    tokens = (np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)).astype(token_dtype(opts.vocab_size))
    if not opts.tokenizer_model and not check_each_line and _digit_count(tokens) != digits:
        return None
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    return ChunkResult(tokens, lengths, bad, chunk.nbytes)


def _parse_in_order(chunks: Iterator[Chunk], opts: Options, workers: int) -> Iterator[ChunkResult]:
    """Chunk results in input order, from ``workers`` processes (at most two chunks each in flight).

    A worker that dies (the OOM killer) stops the run with a PreprocessError naming the chunk it held. Closing
    this generator (an error or Ctrl-C in the caller) kills the workers; nothing here can block on a dead one.
    """
    if workers == 1:
        _init_worker(opts)
        yield from (process_chunk(c, opts) for c in chunks)
        return
    try:
        yield from imap_ordered(partial(process_chunk, opts=opts), chunks, workers, partial(_init_worker, opts))
    except WorkerDied as e:
        raise _worker_died(e.item) from None


def _worker_died(chunk: Chunk | None) -> PreprocessError:
    hint = "(out of memory? try fewer --workers or a smaller --chunk-size-mb)"
    if chunk is None:  # it died before it was given any work
        return PreprocessError(f"a worker process died {hint}")
    return PreprocessError(f"{chunk.path}:{chunk.first_line}: a worker process died parsing the chunk from this line "
                           + hint)


def preprocess(inputs: list[str], output_prefix: str, opts: Options, workers: int = 1,
               chunk_bytes: int = 4 << 20, progress: bool = True) -> Summary:
    """Convert ``inputs`` to ``output_prefix.bin/.idx``.

    Bad input raises PreprocessError, an unwritable output DatasetWriteError, both before any work where they can
    be seen then; in every case (Ctrl-C included) nothing is written and an existing dataset at the prefix stays.
    """
    if opts.tokenizer_model:
        import sentencepiece

        try:
            opts.vocab_size = sentencepiece.SentencePieceProcessor(model_file=opts.tokenizer_model).vocab_size()
        except (OSError, RuntimeError) as e:
            raise PreprocessError(f"cannot load the tokenizer model: {str(e).splitlines()[0]} "
                                  f"({opts.tokenizer_model})") from None
    files = expand_inputs(inputs)
    summary = Summary(files=len(files))
    start = time.perf_counter()
    total = sum(f.stat().st_size for f in files)
    parsed = _parse_in_order(read_chunks(files, chunk_bytes), opts, workers)  # starts on the first result
    writer = IndexedDatasetWriter(output_prefix, token_dtype(opts.vocab_size))  # checks the output first
    with writer, closing(parsed), tqdm(total=total, unit="B", unit_scale=True, desc="preprocess", disable=not progress,
                               smoothing=0.1) as bar:
        for res in parsed:
            if res.bad and not opts.skip_bad_lines:
                path, line, reason = res.bad[0]
                raise PreprocessError(f"{path}:{line}: {reason}")
            summary.skipped += len(res.bad)
            room = 10 - len(summary.first_skipped)
            summary.first_skipped += [f"{p}:{n}: {r}" for p, n, r in res.bad[:max(room, 0)]]
            writer.add_documents(res.tokens, res.lengths)
            summary.documents += len(res.lengths)
            summary.tokens += res.tokens.size
            summary.input_bytes += res.nbytes
            bar.update(res.nbytes)
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(f"{summary.documents / elapsed:,.0f} docs/s, "
                                f"{summary.tokens / elapsed / 1e6:,.2f}M tok/s", refresh=False)
    summary.elapsed = time.perf_counter() - start
    summary.output_bytes = summary.tokens * token_dtype(opts.vocab_size).itemsize
    return summary
