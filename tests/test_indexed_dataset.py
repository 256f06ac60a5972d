"""Our MMIDIDX writer/reader against megatron-core 0.16.1's own IndexedDataset."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset as McoreDataset
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_mobilellm.data.indexed_dataset import (DatasetFormatError, IndexedDataset, IndexedDatasetWriter,
                                                     merge_datasets, token_dtype)


def random_docs(rng, n, high):
    return [rng.integers(0, high, size=rng.integers(1, 300)) for _ in range(n)]


@pytest.mark.parametrize("vocab", [32000, 100_000])
def test_mcore_reads_ours(tmp_path, vocab):
    rng = np.random.default_rng(0)
    docs = random_docs(rng, 50, vocab)
    assert token_dtype(vocab) == (np.uint16 if vocab == 32000 else np.int32)
    with IndexedDatasetWriter(tmp_path / "ours", token_dtype(vocab)) as w:
        w.add_document(docs[0])
        w.add_documents(np.concatenate(docs[1:]), [len(d) for d in docs[1:]])
    mc = McoreDataset(str(tmp_path / "ours"))
    assert len(mc) == len(docs)
    assert np.array_equal(mc.document_indices, np.arange(len(docs) + 1))
    for i, d in enumerate(docs):
        assert np.array_equal(mc[i], d)
        assert mc[i].dtype == token_dtype(vocab)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_ours_reads_mcore(tmp_path, dtype):
    rng = np.random.default_rng(1)
    docs = random_docs(rng, 40, 60000)
    builder = IndexedDatasetBuilder(str(tmp_path / "mc.bin"), dtype=dtype)
    for d in docs[:20]:
        builder.add_item(torch.from_numpy(d.astype(np.int64)))
        builder.end_document()
    # Multi-sequence documents: three sequences that form one document.
    builder.add_document(torch.from_numpy(np.concatenate(docs[20:23]).astype(np.int64)), [len(d) for d in docs[20:23]])
    builder.finalize(str(tmp_path / "mc.idx"))
    ours = IndexedDataset(tmp_path / "mc")
    mc = McoreDataset(str(tmp_path / "mc"))
    assert ours.dtype == np.dtype(dtype)
    assert len(ours) == len(mc) == 23
    assert np.array_equal(ours.document_indices, mc.document_indices)
    for i in range(len(ours)):
        assert np.array_equal(ours[i], mc[i])
    long = next(i for i in range(20) if len(docs[i]) >= 7)
    assert np.array_equal(ours.get(long, 2, 5), docs[long][2:7])


def test_writer_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "x", np.uint16) as w:
            w.add_document(np.arange(5))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def write(prefix, docs, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(np.asarray(d))


def test_reader_rejects_bad_files(tmp_path):
    with pytest.raises(DatasetFormatError, match="no such file"):
        IndexedDataset(tmp_path / "missing")
    write(tmp_path / "a", [[1, 2, 3], [4, 5]])
    with open(tmp_path / "a.bin", "r+b") as f:
        f.truncate(6)
    with pytest.raises(DatasetFormatError, match=r"a\.bin.*truncated"):
        IndexedDataset(tmp_path / "a")
    write(tmp_path / "b", [[1, 2, 3]])
    raw = bytearray((tmp_path / "b.idx").read_bytes())
    raw[0:1] = b"X"
    (tmp_path / "b.idx").write_bytes(bytes(raw))
    with pytest.raises(DatasetFormatError, match="bad magic"):
        IndexedDataset(tmp_path / "b")
    write(tmp_path / "c", [[1, 2, 3]])
    raw = bytearray((tmp_path / "c.idx").read_bytes())
    raw[9] = 2
    (tmp_path / "c.idx").write_bytes(bytes(raw))
    with pytest.raises(DatasetFormatError, match="version 2"):
        IndexedDataset(tmp_path / "c")


def test_pointers_are_int64_beyond_2gib(tmp_path):
    from megatron_mobilellm.data.indexed_dataset import write_index
    lengths = np.full(3, 2**30, dtype=np.int64)  # 1 Gi tokens each, 2 GiB each as uint16
    with open(tmp_path / "big.idx", "wb") as f:
        write_index(f, np.dtype(np.uint16), lengths, np.arange(4))
    raw = (tmp_path / "big.idx").read_bytes()
    pointers = np.frombuffer(raw, dtype=np.int64, count=3, offset=34 + 12)
    assert pointers.tolist() == [0, 2**31, 2**32]


def test_merge_keeps_documents(tmp_path):
    write(tmp_path / "a", [[1, 2], [3]])
    write(tmp_path / "b", [[4, 5, 6]])
    assert merge_datasets([tmp_path / "a", tmp_path / "b"], tmp_path / "m") == 3
    mc = McoreDataset(str(tmp_path / "m"))
    assert [mc[i].tolist() for i in range(3)] == [[1, 2], [3], [4, 5, 6]]
    assert mc.document_indices.tolist() == [0, 1, 2, 3]
    # A megatron-core dataset whose second document has two sequences keeps that boundary when merged.
    builder = IndexedDatasetBuilder(str(tmp_path / "mc.bin"), dtype=np.uint16)
    builder.add_document(torch.tensor([7]), [1])
    builder.add_document(torch.tensor([8, 9, 10]), [2, 1])
    builder.finalize(str(tmp_path / "mc.idx"))
    merge_datasets([tmp_path / "a", tmp_path / "mc"], tmp_path / "m3")
    assert IndexedDataset(tmp_path / "m3").document_indices.tolist() == [0, 1, 2, 3, 5]
    merged = McoreDataset(str(tmp_path / "m3"))  # kept alive: its __del__ unmaps what its arrays point into
    assert merged[4].tolist() == [10]
    write(tmp_path / "w", [[1]], np.int32)
    with pytest.raises(DatasetFormatError, match="different token dtypes"):
        merge_datasets([tmp_path / "a", tmp_path / "w"], tmp_path / "m2")


def test_writer_removes_only_dead_writers_temporaries(tmp_path):
    """A writer killed outright leaves its temporaries; the next writer at that prefix removes them, but never
    those of a writer still running."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale, live = tmp_path / f".x.bin.tmp-{int(dead.stdout)}", tmp_path / f".x.idx.tmp-{os.getppid()}"
    stale.write_bytes(b"partial")
    live.write_bytes(b"in progress")
    write(tmp_path / "x", [[1, 2]])
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "x.bin", "x.idx"]
