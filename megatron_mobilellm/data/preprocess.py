"""jsonl shards (token ids or raw text) → one Megatron ``.bin/.idx`` dataset; the engine behind
``tools/preprocess_jsonl.py``.

Inputs are read in order (directories walked in sorted path order, so ``basepath/<node>/*.jsonl`` converts as laid
out) and cut into chunks of lines; chunks are parsed by a process pool and written strictly in input order, so the
output is byte-identical for any number of workers and memory is bounded by ``chunk_bytes × workers``.

Token-id lines take a fast path: the ``"token_ids"`` array is located with byte searches and parsed by numpy's C
parser, and the rest of the object is validated by orjson; any doubt sends the line to the plain
``orjson.loads`` path, which is also what produces the error messages. (Like many JSON readers, the fast path
accepts integers with leading zeros.)
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import time
import warnings
from dataclasses import dataclass, field
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Iterator

import numpy as np
import orjson
from tqdm import tqdm

from megatron_mobilellm.data.indexed_dataset import IndexedDatasetWriter, token_dtype

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
_NOT_INT_CHARS = b"0123456789, \t\r\n"


class BadLine(ValueError):
    """A line that cannot become a document; the message is the reason."""


class PreprocessError(RuntimeError):
    """A bad input line in strict mode; the message is ``file:line: reason``."""


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
    """Files as given, directories → every jsonl file below in sorted path order, globs → sorted matches."""
    files: list[Path] = []
    for spec in inputs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES))
            if not found:
                raise FileNotFoundError(f"--input {spec}: directory has no {'/'.join(SUFFIXES)} files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            found = sorted(Path(f) for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
            if not found:
                raise FileNotFoundError(f"--input {spec}: no such file, directory or glob match")
            files += found
    return files


def _open(path: Path) -> io.BufferedIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError as e:
            raise RuntimeError(f"{path}: reading .zst needs the zstandard package (pip install zstandard)") from e
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    return open(path, "rb")


def read_chunks(files: list[Path], chunk_bytes: int) -> Iterator[Chunk]:
    for path in files:
        line_no = 1
        with _open(path) as f:
            while True:
                lines = f.readlines(chunk_bytes)
                if not lines:
                    break
                yield Chunk(str(path), line_no, lines, sum(map(len, lines)))
                line_no += len(lines)


def _parse_ids_fast(line: bytes, key: bytes, vocab_size: int) -> np.ndarray | None:
    """The ids of a well-formed line, or None when anything looks unusual (the slow path then decides)."""
    k = line.find(key)
    if k < 0:
        return None
    lb = line.find(b"[", k + len(key))
    if lb < 0 or line[k + len(key):lb].strip() != b":":
        return None
    rb = line.find(b"]", lb)
    content = line[lb + 1:rb]
    if rb < 0 or not content.strip() or content.translate(None, _NOT_INT_CHARS):
        return None
    try:
        rest = orjson.loads(line[:lb + 1] + line[rb:])
        ids = np.fromstring(content, dtype=np.int64, sep=",")
    except (orjson.JSONDecodeError, ValueError):
        return None
    # numpy saturates ids beyond int64 at its maximum, so the bound check catches overflow too.
    if (not isinstance(rest, dict) or rest.get(key[1:-1].decode()) != [] or ids.size != content.count(b",") + 1
            or ids.max() >= vocab_size):
        return None
    return ids


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


def _parse_ids_slow(line: bytes, key: str, vocab_size: int) -> np.ndarray:
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
    global _tokenizer
    # numpy's text parser only warns on trailing garbage; make that an error the fast path can catch.
    warnings.filterwarnings("error", message="string or file could not be read to its end")
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
    docs: list[np.ndarray] = []
    bad: list[tuple[str, int, str]] = []
    key = f'"{opts.json_key}"'.encode()
    for i, line in enumerate(chunk.lines):
        try:
            if opts.tokenizer_model:
                ids = _parse_text(line, opts)
            else:
                ids = _parse_ids_fast(line, key, opts.vocab_size)
                if ids is None:
                    ids = _parse_ids_slow(line, opts.json_key, opts.vocab_size)
        except BadLine as e:
            bad.append((chunk.path, chunk.first_line + i, str(e)))
            if not opts.skip_bad_lines:
                break
            continue
        docs.append(ids)
    # Ids are already bounds-checked; shipping them in the output dtype cuts the transfer from workers 4x.
    tokens = (np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)).astype(token_dtype(opts.vocab_size))
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    return ChunkResult(tokens, lengths, bad, chunk.nbytes)


def _process_chunk_star(args: tuple[Chunk, Options]) -> ChunkResult:
    return process_chunk(*args)


def preprocess(inputs: list[str], output_prefix: str, opts: Options, workers: int = 1,
               chunk_bytes: int = 4 << 20, progress: bool = True) -> Summary:
    """Convert ``inputs`` to ``output_prefix.bin/.idx``; raises PreprocessError (and writes nothing) on bad input."""
    if opts.tokenizer_model:
        import sentencepiece

        opts.vocab_size = sentencepiece.SentencePieceProcessor(model_file=opts.tokenizer_model).vocab_size()
    files = expand_inputs(inputs)
    summary = Summary(files=len(files))
    start = time.perf_counter()
    total = sum(f.stat().st_size for f in files)
    jobs = ((c, opts) for c in read_chunks(files, chunk_bytes))
    # fork: workers start in milliseconds and need not re-import the caller's __main__.
    method = "fork" if "fork" in get_all_start_methods() else "spawn"
    pool = get_context(method).Pool(workers, _init_worker, (opts,)) if workers > 1 else None
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="preprocess", disable=not progress, smoothing=0.1)
    if pool is None:
        _init_worker(opts)
    try:
        results = pool.imap(_process_chunk_star, jobs) if pool else map(_process_chunk_star, jobs)
        with IndexedDatasetWriter(output_prefix, token_dtype(opts.vocab_size)) as writer:
            for res in results:
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
    finally:
        bar.close()
        if pool:
            pool.terminate()
    summary.elapsed = time.perf_counter() - start
    summary.output_bytes = summary.tokens * token_dtype(opts.vocab_size).itemsize
    return summary
