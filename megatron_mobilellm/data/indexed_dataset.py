"""Megatron's memory-mapped ``MMIDIDX`` v1 dataset format: writer and zero-copy reader.

``PREFIX.idx`` (little-endian)::

    magic      9 bytes  b"MMIDIDX\\x00\\x00"
    version    <Q       1
    dtype      <B       token dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    S          <Q       number of sequences
    D          <Q       length of the document index (documents + 1)
    lengths    int32[S] tokens per sequence
    pointers   int64[S] byte offset of each sequence in PREFIX.bin
    doc_index  int64[D] sequence index where each document starts, then S

``PREFIX.bin`` holds the tokens of all sequences back to back. We write one sequence per document (what Megatron's
``preprocess_data.py`` writes without sentence splitting) and read any layout megatron-core writes.
Files appear atomically: the writer works on temporary names and renames them only when the index is complete.
"""

from __future__ import annotations

import errno
import hashlib
import struct
from contextlib import ExitStack, contextmanager
from functools import cached_property
from pathlib import Path
from typing import IO, Callable, Iterator

import numpy as np
from tqdm import tqdm

from megatron_mobilellm.atomic import atomic_files, remove_stale_temporaries, write_error_message
from megatron_mobilellm.errors import DatasetFormatError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES: dict[int, type] = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
                                7: np.float32, 8: np.uint16}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (Megatron's threshold, 65,500), else int32."""
    return np.dtype(np.uint16 if vocab_size <= 65500 else np.int32)


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def dataset_stamp(prefix: str | Path) -> tuple[int, int, int] | None:
    """The on-disk identity of the dataset at ``prefix`` (its ``.idx``, renamed into place last), or None: taken
    before and after a run, it tells whether the run replaced the dataset, e.g. when a stop came during the commit."""
    try:
        st = idx_path(prefix).stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


class DatasetWriteError(RuntimeError):
    """The output dataset cannot be written (disk full, permissions, a folder in the way); the message is one line
    naming the path. Nothing was left behind and an existing dataset at the prefix is untouched."""


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise DatasetWriteError(write_error_message(e, path)) from e


class IndexedDatasetWriter:
    """Streams documents into ``PREFIX.bin`` and writes ``PREFIX.idx`` on ``finalize``.

    Use as a context manager: both files are written under temporary names (``megatron_mobilellm.atomic``) and
    appear only when complete; on any exception the temporaries are removed and whatever was at PREFIX before stays.
    The output location is checked on construction, so a bad ``--output-prefix`` fails before any work is done.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype | type):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        paths = [bin_path(prefix), idx_path(prefix)]
        for p in paths:
            if p.is_dir():  # found now, not at the final rename after all the work
                raise DatasetWriteError(write_error_message(IsADirectoryError(errno.EISDIR, "is a directory"), p))
        self._stack = ExitStack()
        with _writing(self.prefix.parent):
            self.prefix.parent.mkdir(parents=True, exist_ok=True)
            for p in paths:
                remove_stale_temporaries(p)
        with _writing(paths[0]):
            self._bin, self._idx = self._stack.enter_context(atomic_files(paths, "wb"))
        self._lengths: list[np.ndarray] = []
        self._doc_starts: list[np.ndarray] = []  # sequence index where each document starts
        self.num_sequences = 0
        self.num_tokens = 0

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append several documents at once: ``tokens`` concatenated, ``lengths`` per document."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given")
        with _writing(bin_path(self.prefix)):
            self._bin.write(tokens.data)
        self._record(lengths, np.arange(len(lengths), dtype=np.int64))
        self.num_tokens += tokens.size

    def add_document(self, tokens: np.ndarray) -> None:
        self.add_documents(tokens, np.array([len(tokens)]))

    def append_dataset(self, ds: "IndexedDataset", on_bytes: Callable[[int], object] | None = None) -> None:
        """Copy another dataset of the same dtype, keeping its sequences and document boundaries; ``on_bytes``
        hears of every block copied (a progress bar)."""
        if ds.dtype != self.dtype:
            raise DatasetFormatError(f"{ds.prefix}: token dtype {ds.dtype}, but this dataset is {self.dtype}")
        src_path = bin_path(ds.prefix)
        try:
            src = open(src_path, "rb")
        except OSError as e:
            raise DatasetFormatError(f"cannot read {src_path}: {e.strerror.lower()}") from e
        with src, _writing(bin_path(self.prefix)):
            while block := src.read(64 << 20):
                self._bin.write(block)
                if on_bytes:
                    on_bytes(len(block))
        self._record(ds.sequence_lengths.astype(np.int64), np.asarray(ds.document_indices[:-1], dtype=np.int64))
        self.num_tokens += ds.num_tokens

    def _record(self, lengths: np.ndarray, doc_starts: np.ndarray) -> None:
        self._lengths.append(lengths)
        self._doc_starts.append(doc_starts + self.num_sequences)
        self.num_sequences += len(lengths)

    def finalize(self) -> None:
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int64)
        doc_index = np.concatenate([*self._doc_starts, [self.num_sequences]]).astype(np.int64)
        with _writing(idx_path(self.prefix)):
            write_index(self._idx, self.dtype, lengths, doc_index)
        with _writing(bin_path(self.prefix)):
            self._stack.close()

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:  # the temporaries go, nothing is renamed
            self._stack.__exit__(exc_type, exc, tb)


def write_index(f: IO[bytes], dtype: np.dtype, lengths: np.ndarray, doc_index: np.ndarray) -> None:
    """Write the ``.idx`` of sequences ``lengths`` (one per document when ``doc_index`` is 0..S) to ``f``."""
    if len(lengths) and lengths.max() > np.iinfo(np.int32).max:
        raise ValueError("a sequence longer than 2^31-1 tokens cannot be indexed")
    # int64 throughout: numpy >= 2 keeps int32 for int32 inputs and would overflow past 2 GiB of tokens.
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    f.write(_HEADER.pack(MAGIC, VERSION, CODE_OF_DTYPE[np.dtype(dtype)], len(lengths), len(doc_index)))
    f.write(lengths.astype(np.int32).tobytes())
    f.write(pointers.tobytes())
    f.write(np.asarray(doc_index, dtype=np.int64).tobytes())


def check_index_arrays(ipath: Path, lengths: np.ndarray, pointers: np.ndarray, doc_index: np.ndarray,
                       itemsize: int) -> None:
    """Vectorised consistency of an opened index, so a corrupted ``.idx`` fails at open instead of mid-run."""
    if len(lengths) and lengths.min() < 0:
        raise DatasetFormatError(f"{ipath}: negative length for sequence {int(np.argmax(lengths < 0))}")
    expected = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=expected[1:])
    bad = np.flatnonzero(pointers != expected)
    if bad.size:
        i = int(bad[0])
        raise DatasetFormatError(f"{ipath}: sequence {i} points to byte {int(pointers[i])}, but the lengths before "
                                 f"it place it at byte {int(expected[i])} (corrupted pointers)")
    if len(doc_index) == 0 or doc_index[0] != 0 or doc_index[-1] != len(lengths) or np.any(np.diff(doc_index) < 0):
        raise DatasetFormatError(f"{ipath}: the document index is not an increasing list of sequence starts "
                                 f"from 0 to {len(lengths)} (corrupted index)")


class IndexedDataset:
    """Read-only, memory-mapped view of ``PREFIX.bin/.idx``; ``ds[i]`` is sequence ``i`` as a numpy view.

    Opening validates the header and that ``.bin`` holds exactly the tokens the index describes, so a truncated
    or mismatched pair fails at start-up with the file's name instead of deep into training.
    """

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for p in (ipath, bpath):
            if not p.is_file():
                raise DatasetFormatError(f"{p}: no such file (data prefix {prefix!r})")
        self._idx = np.memmap(ipath, mode="r", dtype=np.uint8)
        if len(self._idx) < _HEADER.size:
            raise DatasetFormatError(f"{ipath}: too short for an MMIDIDX header ({len(self._idx)} bytes)")
        magic, version, code, n_seq, n_doc = _HEADER.unpack(self._idx[:_HEADER.size].tobytes())
        if magic != MAGIC:
            raise DatasetFormatError(f"{ipath}: bad magic {magic!r}, not a Megatron MMIDIDX index")
        if version != VERSION:
            raise DatasetFormatError(f"{ipath}: unsupported index version {version} (expected {VERSION})")
        if code not in DTYPE_CODES:
            raise DatasetFormatError(f"{ipath}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = _HEADER.size + n_seq * 12 + n_doc * 8
        if len(self._idx) != expected:
            raise DatasetFormatError(f"{ipath}: {len(self._idx)} bytes, header promises {expected}")
        off = _HEADER.size
        self.sequence_lengths = np.frombuffer(self._idx, dtype=np.int32, count=n_seq, offset=off)
        self.sequence_pointers = np.frombuffer(self._idx, dtype=np.int64, count=n_seq, offset=off + 4 * n_seq)
        self.document_indices = np.frombuffer(self._idx, dtype=np.int64, count=n_doc, offset=off + 12 * n_seq)
        check_index_arrays(ipath, self.sequence_lengths, self.sequence_pointers, self.document_indices,
                           self.dtype.itemsize)
        total = int(self.sequence_lengths.sum(dtype=np.int64)) * self.dtype.itemsize
        size = bpath.stat().st_size
        if size != total:
            raise DatasetFormatError(f"{bpath}: {size} bytes, but {ipath} describes {total} "
                                     "(truncated or mismatched pair)")
        self._bin = np.memmap(bpath, mode="r", dtype=np.uint8) if size else np.zeros(0, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @cached_property
    def identity(self) -> dict:
        """What index arrays built from this dataset depend on, for cache keys: a dataset rewritten in place,
        even with the same sizes and document count, gets a new identity (file times and a hash of the lengths)."""
        ipath, bpath = idx_path(self.prefix), bin_path(self.prefix)
        ist, bst = ipath.stat(), bpath.stat()
        lengths_hash = hashlib.blake2b(memoryview(np.ascontiguousarray(self.sequence_lengths)), digest_size=16)
        return {"prefix": str(Path(self.prefix).resolve()), "idx_size": ist.st_size, "idx_mtime_ns": ist.st_mtime_ns,
                "bin_size": bst.st_size, "bin_mtime_ns": bst.st_mtime_ns, "lengths_blake2b": lengths_hash.hexdigest()}

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``i`` (a view into the mapped file)."""
        n = int(self.sequence_lengths[i]) - offset if length is None else length
        start = int(self.sequence_pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, dtype=self.dtype, count=n, offset=start)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)


def merge_datasets(prefixes: list[str | Path], output_prefix: str | Path, progress: bool = False) -> int:
    """Concatenate datasets (same token dtype) into one, keeping every sequence and document boundary.

    Returns the number of sequences written; output appears atomically as with the writer.
    """
    datasets = []
    for p in prefixes:
        try:
            datasets.append(IndexedDataset(p))
        except OSError as e:
            raise DatasetFormatError(f"cannot read {e.filename or p}: {e.strerror.lower()}") from e
    if len({ds.dtype for ds in datasets}) != 1:
        raise DatasetFormatError("cannot merge datasets of different token dtypes: "
                                 + ", ".join(f"{ds.prefix}={ds.dtype}" for ds in datasets))
    total = sum(ds.num_tokens * ds.dtype.itemsize for ds in datasets)
    with IndexedDatasetWriter(output_prefix, datasets[0].dtype) as writer, \
            tqdm(total=total, unit="B", unit_scale=True, desc="merge", disable=not progress) as bar:
        for ds in datasets:
            writer.append_dataset(ds, bar.update)
    return writer.num_sequences
