"""ZeRO-3 trains exactly like ZeRO-2: 2 ranks on CPU, fp32, the trainer's chunked loss, tied and untied embeddings.

Only the reduction order of gradients may differ between the stages, so losses and gradient norms must agree to
fp32 round-off. The shipped ``zero3.json`` keeps parameters below its persistence threshold whole on every rank,
which at the tiny preset would be all of them; the test lowers the threshold to 0 so that every parameter,
the tied embedding included, is partitioned, gathered for its uses and has its gradient reduce-scattered.
"""

import json

import pytest

from helpers import ROOT, make_corpus, read_scalars, run_pretrain, tiny_args

ITERS = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("data") / "corpus", num_docs=120)


@pytest.fixture(scope="module")
def zero3_partitioned(tmp_path_factory):
    config = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path_factory.mktemp("ds") / "zero3_partition_all.json"
    path.write_text(json.dumps(config))
    return path


def train_scalars(corpus, work, ds_config, untie: bool) -> dict[str, dict[int, float]]:
    # Several loss chunks per micro-batch (2 × 32 tokens, chunks of 24), 2 micro-batches of accumulation per rank.
    overrides = {"--deepspeed_config": ds_config, "--seq-length": 32, "--loss-chunk-size": 24, "--eval-iters": 0,
                 "--fp32": "", "--tensorboard-dir": work / "tb", "--untie-embeddings": "" if untie else None}
    run_pretrain(tiny_args(corpus, work, iters=ITERS, **overrides), nproc=2)
    return read_scalars(work / "tb")


@pytest.mark.parametrize("untie", [False, True], ids=["tied", "untied"])
def test_zero3_matches_zero2(corpus, zero3_partitioned, tmp_path, untie):
    zero2 = train_scalars(corpus, tmp_path / "zero2", ROOT / "ds_configs" / "zero2.json", untie)
    zero3 = train_scalars(corpus, tmp_path / "zero3", zero3_partitioned, untie)
    for tag in ("train/loss", "train/grad_norm"):
        assert sorted(zero3[tag]) == sorted(zero2[tag]) == list(range(1, ITERS + 1)), tag
        for it, expected in zero2[tag].items():
            assert zero3[tag][it] == pytest.approx(expected, rel=1e-5), (tag, it)
    assert zero2["train/loss"][ITERS] < zero2["train/loss"][1] - 0.3  # it trained, so the weights did move
