import os

import pytest
import torch

from helpers import make_corpus, run_pretrain, tiny_args

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="module")
def corpus(request, tmp_path_factory):
    """A small learnable dataset per test module; a module sets ``CORPUS_DOCS`` to change its size."""
    return make_corpus(tmp_path_factory.mktemp("data") / "corpus",
                       num_docs=getattr(request.module, "CORPUS_DOCS", 300))


@pytest.fixture(scope="session")
def zero2_checkpoint(tmp_path_factory):
    """A 2-iteration ZeRO-2 run on one rank: model states, optimizer partition and RNG files, as every stage writes
    them. Trained once for the session; a test that changes it works on a copy."""
    work = tmp_path_factory.mktemp("zero2_checkpoint")
    data = make_corpus(work / "corpus", num_docs=100)
    run_pretrain(tiny_args(data, work, iters=2, zero=2, **{"--save": work / "ckpt", "--eval-iters": 0}))
    return work / "ckpt"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
