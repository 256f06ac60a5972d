"""Sample construction, splits, blending and the data-parallel-invariant sampler."""

import importlib.util
import os
import re
import warnings

import numpy as np
import pytest
import torch

from helpers import make_corpus, run_pretrain, tiny_args
from megatron_mobilellm import pretrain
from megatron_mobilellm.data.blended_dataset import blend_assignment, blend_assignment_numpy, megatron_helpers
from megatron_mobilellm.data.builder import build_datasets, check_data_args, parse_data_path
from megatron_mobilellm.data.gpt_dataset import GPTDataset, normalize, num_epochs_needed, parse_split, split_ranges
from megatron_mobilellm.data.indexed_dataset import DatasetFormatError, IndexedDataset, IndexedDatasetWriter
from megatron_mobilellm.data.sampler import GlobalBatchSampler
from megatron_mobilellm.errors import user_message
from megatron_mobilellm.training.arguments import parse_args


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
    # Every sample of both epochs is built; the document order holds each document once per epoch.
    assert len(gpt) == (2 * tokens_per_epoch - 1) // seq >= num_samples
    order = np.asarray(gpt.document_index)
    assert sorted(order) == sorted(list(documents) * 2)
    ref = reference_samples(docs, order, seq, len(gpt))
    shuffle = np.asarray(gpt.shuffle_index)
    assert sorted(shuffle) == list(range(len(gpt)))
    for i in range(len(gpt)):
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


def test_blend_keeps_every_prefix_near_the_weights():
    for weights in ([0.7, 0.3], [0.5, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]):
        d, s = blend_assignment(weights, 20000)
        w = np.asarray(normalize(weights))
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


def needs(module_available: bool, reason: str) -> None:
    """Skip without an optional dependency, except in CI, where the dependency is part of the test setup."""
    if not module_available:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI installs it)")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def megatron_core():
    """megatron-core's dataset classes (its import takes several seconds, so once per module)."""
    needs(importlib.util.find_spec("megatron") is not None, "megatron-core is not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset as CoreGPTDataset, GPTDatasetConfig
    return BlendedMegatronDatasetBuilder, CoreGPTDataset, GPTDatasetConfig


class TokenizerStub:
    """What megatron-core's GPTDatasetConfig reads from a tokenizer when the tokens are already ids."""

    vocab_size = None  # token dtype from the .idx
    eod = 0
    unique_identifiers = {"class": "TokenizerStub"}


@pytest.fixture(scope="module")
def parity_data(tmp_path_factory):
    """Two datasets with documents from empty to longer than several samples."""
    root = tmp_path_factory.mktemp("parity")
    for name, n, seed in (("a", 600, 1), ("b", 700, 2)):
        rng = np.random.default_rng(seed)
        lengths = np.where(np.arange(n) % 97 == 5, 0, rng.integers(1, 200, n))
        make_dataset(root / name, lengths, seed)
    return root


def core_tokens(ds, i: int) -> np.ndarray:
    """megatron-core's sample ``i`` as the ``seq_length + 1`` token ids, without its masks."""
    if hasattr(ds, "dataset_index"):  # a BlendedDataset
        return core_tokens(ds.datasets[ds.dataset_index[i]], int(ds.dataset_sample_index[i]))
    return ds._query_document_sample_shuffle_indices(i)[0]


@pytest.mark.parametrize("blend", ["single", "0.7/0.3", "unweighted"])
@pytest.mark.parametrize("split", ["969,30,1", "98,2,0"])
def test_every_sample_equals_megatron_core(parity_data, megatron_core, tmp_path, blend, split):
    Builder, CoreGPTDataset, Config = megatron_core
    a, b = str(parity_data / "a"), str(parity_data / "b")
    seq, seed = 32, 1234
    data_path, core_blend = {"single": ([a], ([a], None)), "0.7/0.3": (["0.7", a, "0.3", b], ([a, b], [0.7, 0.3])),
                             "unweighted": ([a, b], ([a, b], None))}[blend]
    # Train over 2.3 epochs (the last, used below 80 %, shuffled apart) or 2.9 (shuffled with the others), valid
    # over several; an unweighted blend is one epoch of each dataset by definition.
    train_epoch = sum(len(GPTDataset(IndexedDataset(p), "train", np.arange(*split_ranges(len(IndexedDataset(p)),
                  parse_split(split))[0]), seq, None, seed, tmp_path / "probe")) for p in core_blend[0])
    epochs_x10 = 9 if blend == "unweighted" else 23 if split == "969,30,1" else 29
    num_samples = {"train": train_epoch * epochs_x10 // 10, "valid": 40 if blend == "unweighted" else 150}
    # megatron-core never returns for a split with a positive share but no documents: refuse to start it.
    for p in core_blend[0]:
        ranges = split_ranges(len(IndexedDataset(p)), parse_split(split))
        assert all(r is None or r[1] > r[0] for r in ranges), (p, ranges)
    config = Config(random_seed=seed, sequence_length=seq, blend=core_blend, split=split, path_to_cache=None,
                    tokenizer=TokenizerStub(), reset_position_ids=False, reset_attention_mask=False,
                    eod_mask_loss=False, create_attention_mask=False)
    test_size = None if blend == "unweighted" else 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        core = Builder(CoreGPTDataset, [num_samples["train"], num_samples["valid"], test_size], lambda: True,
                       config).build()
    ours = build_datasets(data_path, split, seq, seed, num_samples, tmp_path / "cache")
    for k, name in enumerate(("train", "valid")):
        theirs, mine = core[k], ours[name]
        assert len(mine) == len(theirs) >= num_samples[name]
        mine_tokens = [(mine.datasets[mine.dataset_index[i]].sample_tokens(int(mine.dataset_sample_index[i]))
                        if hasattr(mine, "dataset_index") else mine.sample_tokens(i)) for i in range(len(mine))]
        equal = sum(np.array_equal(core_tokens(theirs, i), mine_tokens[i]) for i in range(len(mine)))
        assert equal == len(mine), f"{name}: {equal} of {len(mine)} samples equal"
        assert torch.equal(mine[len(mine) - 1]["tokens"], theirs[len(mine) - 1]["tokens"])


def blend_reference(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """megatron-core's blending rule as the plain loop it is."""
    counts = [0] * len(weights)
    dataset_index, sample_index = np.empty(size, dtype=np.int16), np.empty(size, dtype=np.int64)
    for i in range(size):
        errors = [w * max(i, 1) - c for w, c in zip(weights, counts)]
        d = errors.index(max(errors))
        dataset_index[i], sample_index[i] = d, counts[d]
        counts[d] += 1
    return dataset_index, sample_index


@pytest.mark.parametrize("k,size", [(2, 20000), (3, 1025), (10, 30000), (4, 0), (5, 1)])
def test_blend_numpy_equals_megatron_helper_and_reference_loop(k, size):
    rng = np.random.default_rng(k)
    for weights in (rng.random(k).tolist(), [1.0] * k):
        expected = blend_reference(normalize(weights), size)
        for got in (blend_assignment_numpy(normalize(weights), size),
                    blend_assignment_numpy(normalize(weights), size, block=64), blend_assignment(weights, size)):
            assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    needs(megatron_helpers() is not None, "megatron-core's compiled helpers are not installed")
    if k == 10:  # longer streams against the compiled helper alone
        for _ in range(3):
            weights = rng.random(int(rng.integers(2, 12))).tolist()
            got, expected = blend_assignment_numpy(normalize(weights), 300_000), blend_assignment(weights, 300_000)
            assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])


def test_index_cache_is_not_reused_after_a_rewrite_in_place(tmp_path):
    lengths = [40] * 30
    make_dataset(tmp_path / "d", lengths, seed=1)
    first = build_datasets([str(tmp_path / "d")], "1,0,0", 8, 0, {"train": 50}, tmp_path / "c")["train"]
    before = [first.sample_tokens(i).copy() for i in range(len(first))]
    # Same sizes and document count, different tokens; then different lengths with the same total. Each
    # version gets its own cache entry.
    make_dataset(tmp_path / "d", lengths, seed=2)
    again = build_datasets([str(tmp_path / "d")], "1,0,0", 8, 0, {"train": 50}, tmp_path / "c")["train"]
    assert not all(np.array_equal(before[i], again.sample_tokens(i)) for i in range(len(again)))
    make_dataset(tmp_path / "d", [30, 50] * 15, seed=3)
    third = build_datasets([str(tmp_path / "d")], "1,0,0", 8, 0, {"train": 50}, tmp_path / "c")["train"]
    assert len({p.name.split("-")[0] for p in (tmp_path / "c").glob("*-document_index.npy")}) == 3
    docs = [IndexedDataset(tmp_path / "d")[d] for d in range(30)]
    ref = reference_samples(docs, np.asarray(third.document_index), 8, len(third))
    assert all(np.array_equal(third.sample_tokens(i), ref[int(third.shuffle_index[i])]) for i in range(len(third)))


def test_corrupted_pointers_fail_at_open(tmp_path):
    make_dataset(tmp_path / "d", [5, 7, 9])
    idx = tmp_path / "d.idx"
    raw = bytearray(idx.read_bytes())
    header = 9 + 8 + 1 + 8 + 8
    pointer_1 = header + 3 * 4 + 8
    raw[pointer_1:pointer_1 + 8] = np.int64(4).tobytes()  # sequence 1 claims byte 4, its lengths say byte 10
    idx.write_bytes(bytes(raw))
    with pytest.raises(DatasetFormatError, match=r"d\.idx: sequence 1 points to byte 4.*corrupted"):
        IndexedDataset(tmp_path / "d")


def test_empty_splits(tmp_path):
    make_dataset(tmp_path / "d", [30] * 10)
    prefix = [str(tmp_path / "d")]
    with pytest.raises(ValueError, match=r"--split 0,100,0 gives the train split weight 0"):
        build_datasets(prefix, "0,100,0", 8, 0, {"train": 8, "valid": 8})
    with pytest.raises(ValueError, match=r"--split 4,96,0 gives the train split no tokens in .*d \(0 of 10 doc"):
        check_data_args(prefix, "4,96,0", 8, {"train": 8, "valid": 8})
    # 10 documents, split 969,30,1: valid rounds to no document; training goes on without validation.
    warned = check_data_args(prefix, "969,30,1", 8, {"train": 8, "valid": 8})
    assert warned == [f"--split 969,30,1 gives the valid split no tokens in {prefix[0]} (0 of 10 documents); "
                      "the valid split is left out and validation will not run"]
    assert build_datasets(prefix, "969,30,1", 8, 0, {"train": 8, "valid": 8}, tmp_path / "c")["valid"] is None
    assert "weight 0" in check_data_args(prefix, "100,0,0", 8, {"train": 8, "valid": 8})[0]
    # One dataset of a blend without valid documents is left out of the valid blend only.
    make_dataset(tmp_path / "big", [30] * 100)
    blend = ["0.5", str(tmp_path / "big"), "0.5", prefix[0]]
    out = build_datasets(blend, "969,30,1", 8, 0, {"train": 8, "valid": 8}, tmp_path / "c")
    assert len(out["train"].datasets) == 2 and len(out["valid"].datasets) == 1


def test_pretrain_reports_empty_splits(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus", num_docs=20)
    with pytest.raises(SystemExit) as exc:
        pretrain.main(tiny_args(corpus, tmp_path, **{"--split": "0,100,0"}))
    assert exc.value.code == 1
    assert capsys.readouterr().err.strip() == ("error: --split 0,100,0 gives the train split weight 0; "
                                               "training needs documents")
    pretrain.check_data(parse_args(tiny_args(corpus, tmp_path, **{"--split": "100,0,0"})))
    assert "warning: --split 100,0,0 gives the valid split weight 0" in capsys.readouterr().out


def test_pretrain_refuses_a_valid_set_shorter_than_one_validation(tmp_path):
    a, b = make_corpus(tmp_path / "a", num_docs=40, seed=1), make_corpus(tmp_path / "b", num_docs=40, seed=2)
    res = run_pretrain(tiny_args(a, tmp_path, iters=2, **{"--data-path": f"{a} {b}", "--split": "50,50,0",
                                                          "--eval-iters": 50}), check=False)
    assert res.returncode == 1 and "iteration" not in res.stdout
    assert re.fullmatch(r"error: --eval-iters 50 needs 400 validation samples; the valid split has \d+ "
                        r"\(--data-path, --split\)", res.stderr.strip().splitlines()[-1])


def test_out_of_vocabulary_ids_stop_before_the_model(tmp_path):
    ds, docs = make_dataset(tmp_path / "d", [300, 200, 400])
    top = int(max(d.max() for d in docs))
    fine = GPTDataset(ds, "train", np.arange(3), 64, None, 0, tmp_path / "c", vocab_size=top + 1)
    assert all(int(fine[i]["tokens"].max()) <= top for i in range(len(fine)))
    small = GPTDataset(ds, "train", np.arange(3), 64, None, 0, tmp_path / "c", vocab_size=1000)
    with pytest.raises(DatasetFormatError, match=rf"{tmp_path / 'd'}: token id \d+ in sample 0 of the train split "
                                                 r"is not below the model's vocabulary size 1000"):
        small[0]
    loader = torch.utils.data.DataLoader(small, batch_size=2, num_workers=1)
    with pytest.raises(DatasetFormatError) as raised:  # from a worker: the message holds the worker's traceback
        next(iter(loader))
    assert user_message(raised.value).startswith(f"{tmp_path / 'd'}: token id ")
    assert "\n" not in user_message(raised.value)


def test_pretrain_names_the_dataset_with_out_of_vocabulary_ids(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", num_docs=40, vocab=512)
    res = run_pretrain(tiny_args(corpus, tmp_path, iters=2, **{"--vocab-size": 256, "--num-workers": 1}),
                       check=False)
    assert res.returncode == 1 and " iteration        1/" not in res.stdout, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: {corpus}: token id \d+ in sample \d+ of the (train|valid) split is not below the "
                        r"model's vocabulary size 256; .*\(--data-path, --vocab-size\)", last), last
