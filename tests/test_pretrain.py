"""The pretrain entry point on CPU: ZeRO 1/2/3 with 2 processes, exact resume, TensorBoard tags."""

import pytest

from helpers import logged_losses, read_scalars, run_pretrain, tiny_args

TAGS = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/tflops_per_gpu", "train/mfu",
        "train/mem_max_allocated_gib", "valid/loss", "valid/ppl"}


@pytest.fixture(scope="module")
def zero_runs(corpus, tmp_path_factory):
    runs = {}
    for zero in (1, 2, 3):
        work = tmp_path_factory.mktemp(f"zero{zero}")
        res = run_pretrain(tiny_args(corpus, work, iters=30, zero=zero, **{"--tensorboard-dir": work / "tb"}),
                           nproc=2)
        runs[zero] = (res, work)
    work = tmp_path_factory.mktemp("zero3_recompute")
    runs["3+recompute"] = (run_pretrain(tiny_args(corpus, work, iters=30, zero=3,
                                                  **{"--recompute-activations": ""}), nproc=2), work)
    return runs


def test_activation_checkpointing_under_deepspeed_gives_the_same_losses(zero_runs):
    plain, recompute = logged_losses(zero_runs[3][0].stdout), logged_losses(zero_runs["3+recompute"][0].stdout)
    assert plain.keys() == recompute.keys()
    assert all(recompute[i] == pytest.approx(plain[i], rel=1e-6) for i in plain)


def test_zero_stages_train_and_loss_falls(zero_runs):
    for zero, (res, _) in ((z, r) for z, r in zero_runs.items() if isinstance(z, int)):
        losses = logged_losses(res.stdout)
        assert sorted(losses) == list(range(1, 31)), zero
        assert losses[30] < losses[1] - 1.0, (zero, losses[1], losses[30])
        assert "world size 2" in res.stdout and f"ZeRO stage {zero}" in res.stdout


def test_zero_stages_agree(zero_runs):
    # Same data, same init, same maths; only the reduction order of partitioned gradients differs (fp32).
    ref = logged_losses(zero_runs[1][0].stdout)
    for zero in (2, 3):
        losses = logged_losses(zero_runs[zero][0].stdout)
        for it in ref:
            assert losses[it] == pytest.approx(ref[it], rel=1e-4), (zero, it)


def test_tensorboard_has_every_tag(zero_runs):
    _, work = zero_runs[2]
    scalars = read_scalars(work / "tb")
    assert TAGS <= set(scalars)
    assert sorted(scalars["train/loss"]) == list(range(1, 31))
    assert sorted(scalars["valid/loss"]) == [0, 10, 20, 30]
    assert scalars["train/lr"][1] == 0.0 and scalars["train/lr"][3] == pytest.approx(3e-3)
    assert all(v > 0 for v in scalars["train/tokens_per_sec"].values())


def test_resume_is_bitwise_exact(corpus, zero_runs, tmp_path):
    """A run stopped at iteration 10 and relaunched continues zero_runs' uninterrupted ZeRO-1 run (same arguments
    but --save) bit for bit; validation every 10 iterations in both changes nothing in training."""
    full, full_dir = zero_runs[1]
    part_dir = tmp_path / "part"
    args = lambda **more: tiny_args(corpus, tmp_path, iters=30, zero=1,  # noqa: E731
                                    **{"--save-interval": 10, "--save": part_dir, **more})
    first = run_pretrain(args(**{"--exit-interval": 10}), nproc=2)
    assert max(logged_losses(first.stdout)) == 10
    resumed = run_pretrain(args(**{"--load": part_dir, "--tensorboard-dir": tmp_path / "tb_resumed"}), nproc=2)
    assert "resumed from" in resumed.stdout and "at iteration 10" in resumed.stdout
    a = read_scalars(full_dir / "tb")["train/loss"]
    b = read_scalars(tmp_path / "tb_resumed")["train/loss"]
    assert sorted(b) == list(range(11, 31))
    for it in range(11, 31):
        assert a[it] == b[it], (it, a[it], b[it])  # bitwise (fp32 on CPU)
    assert "done: 30 iterations, 240 samples" in full.stdout and "done: 30 iterations, 240 samples" in resumed.stdout


def test_single_process_plain_python(corpus, tmp_path):
    # Default-style data loading (worker processes) must give the same stream as in-process loading.
    res = run_pretrain(tiny_args(corpus, tmp_path, iters=4, zero=0, **{"--eval-iters": 0, "--num-workers": 2}))
    assert "world size 1" in res.stdout and sorted(logged_losses(res.stdout)) == [1, 2, 3, 4]
    inline = run_pretrain(tiny_args(corpus, tmp_path, iters=4, zero=0, **{"--eval-iters": 0}))
    assert logged_losses(res.stdout) == logged_losses(inline.stdout)
