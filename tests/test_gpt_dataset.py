"""Sample construction, splits, blending and the data-parallel-invariant sampler."""

import numpy as np
import pytest

from megatron_mobilellm.data.blended_dataset import blend_assignment
from megatron_mobilellm.data.builder import build_datasets, parse_data_path
from megatron_mobilellm.data.gpt_dataset import GPTDataset, num_epochs_needed, parse_split, split_ranges
from megatron_mobilellm.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter
from megatron_mobilellm.data.sampler import GlobalBatchSampler


def make_dataset(prefix, lengths, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 30000, size=n) for n in lengths]
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in docs:
            w.add_document(d)
    return IndexedDataset(prefix), docs


def reference_samples(docs, document_index, seq_length, num_samples):
    """Obviously correct: concatenate the documents in order and cut overlapping windows."""
    stream = np.concatenate([docs[d] for d in document_index])
    return [stream[i * seq_length:i * seq_length + seq_length + 1] for i in range(num_samples)]


def test_samples_match_slow_reference(tmp_path):
    lengths = [1, 5, 40, 3, 17, 0, 2, 64, 9, 1, 30]  # shorter and longer than a sample, one empty document
    ds_idx, docs = make_dataset(tmp_path / "d", lengths)
    documents = np.arange(len(lengths))
    seq = 16
    tokens_per_epoch = sum(lengths)
    num_samples = tokens_per_epoch // seq + 3  # forces a second epoch
    assert num_epochs_needed(tokens_per_epoch, seq, num_samples) == 2
    gpt = GPTDataset(ds_idx, "train", documents, seq, num_samples, seed=5, cache_dir=tmp_path / "cache")
    # The document order is two independently shuffled epochs.
    order = np.asarray(gpt.document_index)
    assert sorted(order[:len(lengths)]) == list(documents) and sorted(order[len(lengths):]) == list(documents)
    ref = reference_samples(docs, order, seq, num_samples)
    shuffle = np.asarray(gpt.shuffle_index)
    assert sorted(shuffle) == list(range(num_samples))
    for i in range(num_samples):
        got = gpt.sample_tokens(i)
        assert np.array_equal(got, ref[shuffle[i]]), i
        item = gpt[i]
        assert item["tokens"].shape == (seq,) and np.array_equal(item["labels"][:-1], item["tokens"][1:])


def test_index_is_cached_and_deterministic(tmp_path):
    ds_idx, _ = make_dataset(tmp_path / "d", [50] * 20)
    a = GPTDataset(ds_idx, "train", np.arange(20), 8, 100, seed=1, cache_dir=tmp_path / "c")
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert len([f for f in files if f.endswith(".npy")]) == 3
    b = GPTDataset(ds_idx, "train", np.arange(20), 8, 100, seed=1, cache_dir=tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == files
    assert all(np.array_equal(a.sample_tokens(i), b.sample_tokens(i)) for i in range(100))
    c = GPTDataset(ds_idx, "train", np.arange(20), 8, 100, seed=2, cache_dir=tmp_path / "c")
    assert not all(np.array_equal(a.sample_tokens(i), c.sample_tokens(i)) for i in range(100))


def test_splits_are_disjoint_and_cover(tmp_path):
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.03, 0.001])
    ranges = split_ranges(1000, parse_split("969,30,1"))
    assert ranges == [(0, 969), (969, 999), (999, 1000)]
    ranges = split_ranges(7, parse_split("1,1,1"))
    assert ranges[0][0] == 0 and ranges[-1][1] == 7
    assert all(ranges[i][1] == ranges[i + 1][0] for i in range(2))
    with pytest.raises(ValueError, match="--split"):
        parse_split("a,b")
    # Samples of different splits come from different documents: give each document a distinct constant token.
    with IndexedDatasetWriter(tmp_path / "s", np.uint16) as w:
        for d in range(100):
            w.add_document(np.full(20, d))
    out = build_datasets([str(tmp_path / "s")], "80,10,10", 8, 0, {"train": 50, "valid": 10, "test": 10},
                         tmp_path / "c")
    seen = {name: {int(t) for i in range(len(ds)) for t in ds[i]["tokens"]} for name, ds in out.items()}
    assert seen["train"] <= set(range(80)) and seen["valid"] <= set(range(80, 90))
    assert seen["test"] <= set(range(90, 100))


def test_blend_proportions_within_one_sample_at_every_prefix():
    for weights in ([0.7, 0.3], [0.5, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]):
        d, s = blend_assignment(weights, 20000)
        w = np.asarray(weights) / sum(weights)
        n = np.arange(1, len(d) + 1)
        for k in range(len(w)):
            counts = np.cumsum(d == k)
            assert np.abs(counts - w[k] * n).max() <= 1.0
            assert np.array_equal(s[d == k], np.arange((d == k).sum()))


def test_blended_dataset_draws_by_weight(tmp_path):
    make_dataset(tmp_path / "a", [30] * 50, seed=1)
    make_dataset(tmp_path / "b", [30] * 50, seed=2)
    out = build_datasets(["0.75", str(tmp_path / "a"), "0.25", str(tmp_path / "b")], "1,0,0", 10, 0,
                         {"train": 40}, tmp_path / "c")
    train = out["train"]
    assert len(train) == 40 and np.bincount(train.dataset_index).tolist() == [30, 10]
    assert out["valid"] is None
    sample = train[0]["tokens"]
    assert sample.shape == (10,)


def test_data_path_parsing_errors():
    assert parse_data_path(["a", "b"]) == (None, ["a", "b"])
    assert parse_data_path(["0.5", "a", "1", "b"]) == ([0.5, 1.0], ["a", "b"])
    with pytest.raises(ValueError, match="has no dataset prefix"):
        parse_data_path(["0.5", "a", "0.5"])
    with pytest.raises(ValueError, match="looks like a weight"):
        parse_data_path(["a", "0.5", "b"])


def global_stream(total, consumed, micro, dp, iters, accum):
    """The samples each iteration sees, as a list of sets, gathered over ranks and micro-steps."""
    iters_out = []
    samplers = [iter(GlobalBatchSampler(total, consumed, micro, r, dp)) for r in range(dp)]
    for _ in range(iters):
        batch = []
        for _ in range(accum):
            for it in samplers:
                batch += next(it)
        iters_out.append(sorted(batch))
    return iters_out


def test_global_stream_is_independent_of_dp_size():
    gbs = 8
    ref = global_stream(1000, 0, 2, 1, 10, gbs // 2)
    for dp in (2, 4):
        assert global_stream(1000, 0, 2, dp, 10, gbs // (2 * dp)) == ref
    assert global_stream(1000, 0, 1, 4, 10, 2) == ref  # micro-batch 1 × 4 ranks × 2 steps
    assert ref[0] == list(range(8)) and ref[3] == list(range(24, 32))


def test_resume_from_consumed_samples_continues_stream():
    full = global_stream(1000, 0, 2, 2, 10, 2)
    resumed = global_stream(1000, 5 * 8, 2, 4, 5, 1)
    assert resumed == full[5:]
