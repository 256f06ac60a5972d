import os

import pytest
import torch

from helpers import make_corpus, run_pretrain, tiny_args

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # The workers share the cores: torch's default of one intra-op thread per core in each would oversubscribe
    # them (measured: in-process tests took twice the CPU time, spinning).
    torch.set_num_threads(max(1, usable_cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Run whole test directories on two pytest-xdist workers, one test file at a time per worker.

    Most tests wait on one process (a launched trainer, a tool), so a single pytest keeps ~1.2 of 2 cores busy;
    two workers fill both. Whole files stay on one worker so module fixtures (shared training runs) are built once.
    Left alone: an explicit ``-n``/``-p no:xdist``, ``--pdb``, a run of single files or tests, xdist's own workers,
    and a machine with one core."""
    workers = min(2, usable_cores())
    if (not config.pluginmanager.hasplugin("xdist") or config.option.numprocesses is not None
            or config.getoption("usepdb") or os.environ.get("PYTEST_XDIST_WORKER") or workers < 2):
        return
    if all(os.path.isdir(arg.split("::")[0]) for arg in config.args):
        config.option.numprocesses, config.option.dist = workers, "loadfile"
        config.option.loadscopereorder = False  # hand out files in the order below, not by their number of tests


# The files with the longest runs (~50-200 s each on 2 cores), longest first: handed out first, none of them starts
# last and leaves the other worker idle at the end. The other files follow in collection order.
LONGEST_FIRST = ("test_fault_tolerance.py", "test_safety_resume.py", "test_convert.py", "test_pretrain.py",
                 "test_examples.py", "test_zero3.py", "test_quickstart.py", "test_benchmark.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable within a file


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
