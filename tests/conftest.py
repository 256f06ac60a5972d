import os

import pytest
import torch

from helpers import make_corpus

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="module")
def corpus(request, tmp_path_factory):
    """A small learnable dataset per test module; a module sets ``CORPUS_DOCS`` to change its size."""
    return make_corpus(tmp_path_factory.mktemp("data") / "corpus",
                       num_docs=getattr(request.module, "CORPUS_DOCS", 300))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
