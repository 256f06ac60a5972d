"""Fault injection: kill -9 mid-save, preemption signals, NaN losses, damaged checkpoints, data faults, and resume
on a different number of ranks. Each proves that relaunching the same command continues the same run."""

import os
import re
import shutil
import signal
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import logged_losses, make_corpus, pretrain_cmd, read_scalars, run_pretrain, tiny_args, trainer_env
from megatron_mobilellm import pretrain
from megatron_mobilellm.training.guard import BadStepPolicy

CORPUS_DOCS = 200


def launch(args, nproc=2, extra_env=None):
    return subprocess.Popen(pretrain_cmd(args, nproc), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**trainer_env(args), **(extra_env or {})}, start_new_session=True)


def wait_for_line(proc, needle, timeout=300):
    """Read the process's output until a line contains ``needle``; returns that line and everything before."""
    seen, deadline = [], time.time() + timeout
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return line, "".join(seen)
        assert time.time() < deadline, f"timed out waiting for {needle!r}"
    raise AssertionError(f"process ended before printing {needle!r}:\n{''.join(seen)[-3000:]}")


def worker_pids(launcher_pid):
    """PIDs of the trainer processes below a launcher (read from /proc)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text().split()
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat[3]) == launcher_pid and b"megatron_mobilellm.pretrain" in cmd:
                pids.append(int(d.name))
    return sorted(pids)


def common(corpus, work, save, **kw):
    return tiny_args(corpus, work, iters=30, zero=1, **{"--save": save, "--load": save, "--save-interval": 10,
                                                        "--eval-iters": 0, **kw})


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """Train losses of one uninterrupted 60-iteration run (ZeRO-1, 2 ranks, fp32, no saves before the end), shared by
    the tests below: a run that was killed or signalled and relaunched must reproduce them bit for bit, because
    saving, stopping and resuming never change the maths (nor does --save-interval or --exit-interval)."""
    work = tmp_path_factory.mktemp("reference")
    res = run_pretrain(common(corpus, work, work / "ckpt", **{"--train-iters": 60, "--save-interval": 1000,
                                                               "--tensorboard-dir": work / "tb"}), nproc=2)
    assert "done: 60 iterations" in res.stdout
    return read_scalars(work / "tb")["train/loss"]


def test_kill9_during_save_resumes_from_previous_complete_checkpoint(corpus, tmp_path, reference):
    # The reference's schedule (60 iterations); --exit-interval ends both launches of the same command at 30.
    kw = {"--train-iters": 60, "--exit-interval": 30}
    save = tmp_path / "ckpt"
    proc = launch(common(corpus, tmp_path, save, **kw), extra_env={"MEGATRON_MOBILELLM_TEST_SAVE_DELAY": "20:120"})
    line, _ = wait_for_line(proc, "save of iteration 20 in progress on rank 1")
    os.kill(int(re.search(r"rank 1 \(pid (\d+)\)", line).group(1)), signal.SIGKILL)  # one rank dies mid-save
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)  # and the scheduler tears the job down
    proc.wait(timeout=60)
    assert (save / "latest").read_text() == "iter_0000010"
    assert (save / "iter_0000020").is_dir() and not (save / "iter_0000020" / "manifest.json").exists()
    again = run_pretrain(common(corpus, tmp_path, save, **kw, **{"--tensorboard-dir": tmp_path / "tb_again"}),
                         nproc=2)
    assert "resumed from" in again.stdout and "at iteration 10" in again.stdout
    b = read_scalars(tmp_path / "tb_again")["train/loss"]
    assert sorted(b) == list(range(11, 31))
    assert all(reference[i] == b[i] for i in range(11, 31))  # bitwise, fp32
    assert (save / "latest").read_text() == "iter_0000030" and (save / "iter_0000020" / "manifest.json").exists()


@pytest.fixture(scope="module")
def kept_two(corpus, tmp_path_factory):
    """A 40-iteration run on one rank that saved every 10 iterations with --keep-last 2."""
    work = tmp_path_factory.mktemp("keep_last")
    run_pretrain(common(corpus, work, work / "ckpt", **{"--train-iters": 40, "--keep-last": 2}), nproc=1)
    return work / "ckpt"


def test_keep_last_prunes_old_checkpoints(kept_two):
    assert sorted(p.name for p in kept_two.glob("iter_*")) == ["iter_0000030", "iter_0000040"]


def test_damaged_latest_falls_back_with_a_warning(corpus, tmp_path, kept_two):
    save = shutil.copytree(kept_two, tmp_path / "ckpt")
    shard = sorted((save / "iter_0000040").glob("*optim_states.pt"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # a truncated shard after the fact
    res = run_pretrain(common(corpus, tmp_path, save, **{"--train-iters": 40}), nproc=1)
    assert "warning: skipping checkpoint" in res.stdout and "has 100 bytes, the manifest says" in res.stdout
    assert "resumed from" in res.stdout and "at iteration 30" in res.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_saves_and_exits_cleanly(corpus, tmp_path, reference, sig):
    kw = {"--train-iters": 60, "--save-interval": 1000}  # the reference's run: the signal's save is the only one
    save = tmp_path / "ckpt"
    proc = launch(common(corpus, tmp_path, save, **{**kw, "--tensorboard-dir": tmp_path / "tb_1"}))
    wait_for_line(proc, "iteration        5/")
    os.kill(worker_pids(proc.pid)[-1], sig)  # one rank gets the signal; all must agree to stop
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    stopped = [line for line in out.splitlines() if "exiting at iteration" in line]
    assert stopped and (f"after a stop signal ({sig.name})" in stopped[0] or "on another rank" in stopped[0])
    k = int(stopped[0].split("exiting at iteration ")[1].split()[0])
    assert 5 <= k < 60 and (save / "latest").read_text() == f"iter_{k:07d}"
    again = run_pretrain(common(corpus, tmp_path, save, **{**kw, "--tensorboard-dir": tmp_path / "tb_2"}), nproc=2)
    assert f"at iteration {k}" in again.stdout
    b = read_scalars(tmp_path / "tb_2")["train/loss"]
    assert all(reference[i] == b[i] for i in range(k + 1, 61))


def test_exit_duration_saves_and_exits(corpus, tmp_path):
    res = run_pretrain(common(corpus, tmp_path, tmp_path / "ckpt", **{"--train-iters": 100000,
                                                                       "--exit-duration-in-mins": 0.05}), nproc=1)
    assert "after --exit-duration-in-mins 0.05" in res.stdout and (tmp_path / "ckpt" / "latest").exists()


@pytest.mark.parametrize("zero,bf16", [(0, False), (1, False), (3, False), (2, True)])  # bf16: the fused check
def test_nan_loss_is_skipped_and_counted(corpus, tmp_path, zero, bf16):
    res = run_pretrain(tiny_args(corpus, tmp_path, iters=8, zero=zero,
                                 **{"--inject-nan-loss-at": "5", "--eval-iters": 0, "--bf16": "" if bf16 else None,
                                    "--tensorboard-dir": tmp_path / "tb"}), nproc=1)
    assert "skipped the update of iteration 5" in res.stdout and "1 skipped updates" in res.stdout
    scalars = read_scalars(tmp_path / "tb")
    losses, lrs = scalars["train/loss"], scalars["train/lr"]
    assert all(np.isfinite(losses[i]) for i in (6, 7, 8))
    assert lrs[6] == lrs[5]  # the schedule did not advance for the discarded update
    assert scalars["train/skipped_steps"][8] == 1


def test_consecutive_nan_losses_stop_the_run(corpus, tmp_path):
    res = run_pretrain(tiny_args(corpus, tmp_path, iters=20, zero=2,
                                 **{"--inject-nan-loss-at": "4,5,6", "--max-skipped-steps": 3, "--eval-iters": 0}),
                       nproc=2, check=False)
    assert res.returncode != 0
    assert ("3 consecutive updates skipped (--max-skipped-steps 3), the last at iteration 6, "
            "global samples [40, 48) of the train split") in res.stderr


def test_loss_spike_detection_skips_exactly_the_spikes(corpus, tmp_path):
    """Replays the run's own losses: after the warm-up, an update is skipped exactly when its loss exceeds the factor
    times the mean of the previous applied losses in the window (borderline cases within the printed precision of a
    skipped loss are not judged)."""
    factor = 1.0001  # barely above 1: ordinary batch-to-batch noise makes about half the steps "spikes"
    res = run_pretrain(tiny_args(corpus, tmp_path, iters=40, zero=1,
                                 **{"--loss-spike-factor": factor, "--max-skipped-steps": 100, "--eval-iters": 0,
                                    "--lr": "1e-5"}), nproc=1)
    logged = logged_losses(res.stdout)  # NaN where the interval's only update was skipped
    skipped = {int(m[1]): float(m[2]) for m in re.finditer(r"skipped the update of iteration (\d+) \(loss ([^,]+),",
                                                          res.stdout)}
    reference = BadStepPolicy(max_consecutive=100, spike_factor=factor)  # only for its window and warm-up sizes
    recent: list[float] = []
    judged = {True: 0, False: 0}
    for it in range(1, 41):
        loss = skipped[it] if it in skipped else logged[it]
        if len(recent) < reference.warmup:
            assert it not in skipped, f"iteration {it} skipped during the warm-up"
        else:
            threshold = factor * statistics.fmean(recent[-reference.recent.maxlen:])
            if abs(loss - threshold) > 1e-4 * threshold:
                assert (loss > threshold) == (it in skipped), (it, loss, threshold)
                judged[loss > threshold] += 1
        if it not in skipped:
            assert np.isfinite(loss)
            recent.append(loss)
    assert judged[True] >= 3 and judged[False] >= 3, judged  # both outcomes actually occurred
    assert f"done: 40 iterations, 320 samples, {len(skipped)} skipped updates" in res.stdout


def corrupt(prefix: Path, kind: str) -> Path:
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    if kind == "magic":
        idx.write_bytes(b"NOTMMIDX\x00" + idx.read_bytes()[9:])
    elif kind == "version":
        raw = bytearray(idx.read_bytes())
        raw[9] = 7
        idx.write_bytes(bytes(raw))
    elif kind == "bin_size":
        bin_.write_bytes(bin_.read_bytes()[:-10])
    elif kind == "missing_bin":
        bin_.unlink()
    return {"magic": idx, "version": idx, "bin_size": bin_, "missing_bin": bin_}[kind]


@pytest.mark.parametrize("kind,message", [("magic", "bad magic"), ("version", "unsupported index version 7"),
                                          ("bin_size", "truncated or mismatched pair"),
                                          ("missing_bin", "no such file")])
def test_data_faults_fail_before_training(tmp_path, capsys, kind, message):
    data = make_corpus(tmp_path / "d", num_docs=30)
    bad_file = corrupt(data, kind)
    with pytest.raises(SystemExit) as exc:  # the trainer's entry point in this process: it stops before any
        pretrain.main(tiny_args(data, tmp_path))  # process group or model exists
    out, err = capsys.readouterr()
    assert exc.value.code == 1 and str(bad_file) in err and message in err
    assert "iteration" not in out


def fewer_args(corpus, work, zero, save, **more):
    return tiny_args(corpus, work, iters=20, zero=zero, **{"--save": save, "--load": save, "--save-interval": 10,
                                                           "--global-batch-size": 16, "--eval-iters": 0, **more})


@pytest.fixture(scope="module")
def fewer_reference(corpus, tmp_path_factory):
    """Train losses of one uninterrupted run (ZeRO-1, 2 ranks) for every case below: ZeRO-1 and ZeRO-2 on any
    number of ranks differ only in the reduction order of gradients (test_pretrain's test_zero_stages_agree), the
    same difference a resumed run on fewer ranks has and the 1e-4 tolerance allows for."""
    work = tmp_path_factory.mktemp("fewer_reference")
    run_pretrain(fewer_args(corpus, work, 1, work / "ckpt", **{"--tensorboard-dir": work / "tb"}), nproc=2)
    return read_scalars(work / "tb")["train/loss"]


# 4 → 2 stands for a node's save resumed on part of it: DeepSpeed's universal format merges the 4 saved ZeRO
# partitions and splits them again for 2 ranks (each new partition spans two saved ones), the same conversion and
# loading code an 8 → 2 resume runs, at half the processes on a small CI machine.
@pytest.mark.parametrize("zero,ranks,fewer", [(1, 2, 1), (2, 2, 1), (2, 4, 2)])
def test_resume_on_fewer_ranks_continues_the_run(corpus, tmp_path, fewer_reference, zero, ranks, fewer):
    save = tmp_path / "ckpt"
    run_pretrain(fewer_args(corpus, tmp_path, zero, save, **{"--exit-interval": 10}), nproc=ranks)
    res = run_pretrain(fewer_args(corpus, tmp_path, zero, save, **{"--tensorboard-dir": tmp_path / "tb_fewer"}),
                       nproc=fewer)
    assert (f"saved by {ranks} ranks; loading it through DeepSpeed's universal checkpoint format for {fewer}"
            in res.stdout)
    assert "at iteration 10" in res.stdout and "done: 20 iterations, 320 samples" in res.stdout
    a, b = fewer_reference, read_scalars(tmp_path / "tb_fewer")["train/loss"]
    for i in range(11, 21):  # same data, same optimizer state; only the reduction order differs
        assert b[i] == pytest.approx(a[i], rel=1e-4), i
