"""Checkpoint safety under mistakes: a rolled-back ``latest``, retention, every tag invalid, and ranks that could
disagree about what to resume. Nothing the user saved is deleted or silently resumed past."""

import json
import os
import signal
import subprocess
import sys
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch

from helpers import ROOT, env, free_port, require, require_tools, run_pretrain, tiny_args, trainer_env
from megatron_mobilellm.checkpoint_layout import iteration_tags, write_latest, write_manifest
from megatron_mobilellm.errors import CheckpointError
from megatron_mobilellm.training.checkpointing import _prune, plan_resume, set_aside_newer

CORPUS_DOCS = 120


def fake_tag(save: Path, iteration: int, complete: bool = True) -> str:
    tag = f"iter_{iteration:07d}"
    (save / tag).mkdir(parents=True)
    (save / tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * iteration)
    if complete:
        write_manifest(save / tag, iteration, 1, 0)
    return tag


def test_tags_rank_by_iteration_not_name(tmp_path):
    for it in (9_999_999, 10_000_000, 5):
        fake_tag(tmp_path, it)
    assert iteration_tags(tmp_path) == ["iter_10000000", "iter_9999999", "iter_0000005"]


def test_retention_after_rollback_keeps_latest_and_the_new_save(tmp_path):
    for it in (10, 20, 30):
        fake_tag(tmp_path, it)
    write_latest(tmp_path, "iter_0000010")  # the user rolls back
    plan = plan_resume(str(tmp_path), 1)
    assert plan.tag == "iter_0000010"
    set_aside_newer(str(tmp_path), 10, plan.tag, log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000010", "iter_0000020.set-aside-1", "iter_0000030.set-aside-1", "latest"]
    fake_tag(tmp_path, 20)  # the resumed run saves again at 20
    _prune(tmp_path, 1, "iter_0000020")  # latest still names 10 (e.g. a commit interrupted here): both survive
    assert {"iter_0000010", "iter_0000020"} <= {p.name for p in tmp_path.iterdir()}
    write_latest(tmp_path, "iter_0000020")
    _prune(tmp_path, 1, "iter_0000020")
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == [
        "iter_0000020", "iter_0000020.set-aside-1", "iter_0000030.set-aside-1"]


def test_rolled_back_latest_never_falls_forward(tmp_path):
    fake_tag(tmp_path, 10)
    fake_tag(tmp_path, 20, complete=False)
    fake_tag(tmp_path, 30)  # newer than latest: abandoned, not a fallback
    write_latest(tmp_path, "iter_0000020")
    assert plan_resume(str(tmp_path), 1, log=lambda _: None).tag == "iter_0000010"


def test_no_valid_tag_is_an_error_listing_each(tmp_path):
    fake_tag(tmp_path, 10, complete=False)
    fake_tag(tmp_path, 20)
    (tmp_path / "iter_0000020" / "mp_rank_00_model_states.pt").write_bytes(b"short")
    write_latest(tmp_path, "iter_0000020")
    with pytest.raises(CheckpointError) as e:
        plan_resume(str(tmp_path), 1, log=lambda _: None)
    assert "iter_0000020: mp_rank_00_model_states.pt has 5 bytes, the manifest says 20" in str(e.value)
    assert "iter_0000010: no manifest" in str(e.value) and "--override-invalid-checkpoints" in str(e.value)
    assert plan_resume(str(tmp_path), 1, start_over=True, log=lambda _: None) is None


def common(corpus, work, save, **kw):
    return tiny_args(corpus, work, iters=20, zero=1, **{"--save": save, "--load": save, "--save-interval": 10,
                                                        "--eval-iters": 0, "--log-interval": 5, **kw})


@pytest.fixture(scope="module")
def three_saves(corpus, tmp_path_factory):
    """A 30-iteration run on one rank saved at 10, 20 and 30 (latest 30); the tests below change copies of it."""
    work = tmp_path_factory.mktemp("three_saves")
    run_pretrain(common(corpus, work, work / "ckpt", **{"--train-iters": 30}))
    return work / "ckpt"


def test_rollback_resume_sets_aside_newer_tags(corpus, tmp_path, three_saves):
    save = shutil.copytree(three_saves, tmp_path / "ckpt")
    write_latest(save, "iter_0000010")
    res = run_pretrain(common(corpus, tmp_path, save, **{"--keep-last": 1}))
    assert "resumed from" in res.stdout and "at iteration 10" in res.stdout
    assert "set aside" in res.stdout
    assert sorted(p.name for p in save.glob("iter_*")) == [
        "iter_0000020", "iter_0000020.set-aside-1", "iter_0000030.set-aside-1"]
    assert (save / "latest").read_text() == "iter_0000020"
    assert json.loads((save / "iter_0000030.set-aside-1" / "manifest.json").read_text())["iteration"] == 30


def test_all_tags_invalid_stops_unless_told_to_start_over(corpus, tmp_path, three_saves):
    save = shutil.copytree(three_saves, tmp_path / "ckpt")
    (save / "iter_0000010" / "manifest.json").unlink()
    for tag in ("iter_0000020", "iter_0000030"):
        shard = sorted((save / tag).glob("*optim_states.pt"))[0]
        shard.write_bytes(shard.read_bytes()[:100])
    before = {p: p.read_bytes() for p in save.rglob("*") if p.is_file()}
    res = run_pretrain(common(corpus, tmp_path, save), check=False)
    assert res.returncode == 1 and "iteration" not in res.stdout.replace("at iteration", "")
    error = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "iter_0000010: no manifest" in error[0]
    assert "iter_0000020: " in error[0] and "iter_0000030: " in error[0]
    assert {p: p.read_bytes() for p in save.rglob("*") if p.is_file()} == before
    res = run_pretrain(common(corpus, tmp_path, save, **{"--override-invalid-checkpoints": ""}))
    assert "starting from scratch" in res.stdout and "done: 20 iterations" in res.stdout
    for path, data in before.items():  # nothing deleted: every old file is still there, under a set-aside name
        first, *rest = path.relative_to(save).parts
        if rest or first == "latest":  # (DeepSpeed rewrites its zero_to_fp32.py helpers beside the tags)
            assert save.joinpath(f"{first}.set-aside-1", *rest).read_bytes() == data, path
    assert (save / "latest").read_text() == "iter_0000020"


def test_ranks_follow_rank_zeros_resume_decision_while_latest_changes(corpus, tmp_path):
    """A leftover run rewriting ``latest`` while two ranks start: they must resume the same tag (each rank reading
    ``latest`` itself could resume different iterations and hang at the end)."""
    load = tmp_path / "ckpt"
    run_pretrain(common(corpus, tmp_path, load, **{"--save-interval": 5, "--train-iters": 10}), nproc=2)
    stop = threading.Event()

    def flip():
        while not stop.is_set():
            for tag in ("iter_0000005", "iter_0000010"):
                write_latest(load, tag)

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    try:
        res = run_pretrain(common(corpus, tmp_path, tmp_path / "out", **{"--load": load, "--train-iters": 12}),
                           nproc=2, timeout=300)
    finally:
        stop.set()
        flipper.join()
    resumed = re.search(r"resumed from \S+ at iteration (\d+)", res.stdout)
    assert resumed and resumed[1] in ("5", "10") and "done: 12 iterations" in res.stdout


def test_terminating_the_deepspeed_launcher_saves_and_stops_the_ranks(corpus, tmp_path):
    """``kill -TERM`` of ``deepspeed`` (``docker stop``, a scheduler) ends only that process; its ranks notice the
    launcher is gone, save at the current iteration and exit instead of training on unsaved."""
    save = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "megatron_mobilellm.pretrain",
           *common(corpus, tmp_path, save, **{"--train-iters": 1000, "--save-interval": 1000, "--log-interval": 1})]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=trainer_env(cmd),
                            cwd=tmp_path, start_new_session=True)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "iteration        3/" in line:
                break
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        watchdog = threading.Timer(240, os.killpg, (proc.pid, signal.SIGKILL))
        watchdog.start()
        seen += list(proc.stdout)  # EOF: every rank (and DeepSpeed's per-node launcher) has exited
        watchdog.cancel()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(seen)
    stopped = re.search(r"exiting at iteration (\d+) after a stop signal( \(launcher pid \d+ exited\)| on another rank)",
                        out)  # rank 0 may notice second and hear it from rank 1
    assert stopped and int(stopped[1]) < 100, out[-3000:]
    assert (save / "latest").read_text() == f"iter_{int(stopped[1]):07d}"
    assert (save / f"iter_{int(stopped[1]):07d}" / "manifest.json").is_file()


def in_small_tmpfs(mount: Path, options: str, cmd: list[str]) -> subprocess.CompletedProcess:
    """Run ``cmd`` with a tmpfs of ``options`` mounted at ``mount`` (a private mount namespace, no root needed),
    then list what is left on it (the mount ends with the namespace)."""
    require_tools("unshare")
    mount.mkdir()
    script = 'mount -t tmpfs -o "$1" tmpfs "$0" || exit 99; shift; "$@"; rc=$?; echo "left: $(cd "$0" && find . -mindepth 1)"; exit $rc'
    res = subprocess.run(["unshare", "-rm", "sh", "-c", script, str(mount), options, *cmd], capture_output=True,
                         text=True, env=trainer_env(cmd), timeout=600, cwd=ROOT)
    require(res.returncode != 99, f"cannot mount a tmpfs in a user namespace ({res.stderr.strip()[-200:]})")
    return res


@pytest.mark.parametrize("options,message", [("size=1m", "No space left on device"),
                                             ("ro", "not writable (read-only file system")])
def test_disk_full_or_read_only_save_is_one_line_and_leaves_nothing(corpus, tmp_path, options, message):
    save = tmp_path / "mnt" / "ckpt"
    res = in_small_tmpfs(tmp_path / "mnt", options, [sys.executable, "-m", "megatron_mobilellm.pretrain",
                                                     *common(corpus, tmp_path, save, **{"--train-iters": 10})])
    error = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 1 and len(error) == 1 and message in error[0] and str(save) in error[0], res.stderr
    left = res.stdout.split("left: ")[-1].split()
    assert not [p for p in left if "iter_" in p or "latest" in p], left  # the partial tag is gone


def tiny_hf(out: Path, kind: str = "llama", **overrides) -> Path:
    import transformers

    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                                          max_position_embeddings=64, tie_word_embeddings=True, **overrides)
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("kind,overrides,field", [
    ("gpt2", {}, "model_type = 'gpt2'"),
    ("llama", {"attention_bias": True}, "attention_bias = True"),
    ("llama", {"mlp_bias": True}, "mlp_bias = True"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_"),
])
def test_importer_refuses_what_it_cannot_represent(tmp_path, kind, overrides, field):
    from megatron_mobilellm.convert.hf_format import ExportError, read_hf

    hf = tiny_hf(tmp_path / "hf", kind, **overrides)
    with pytest.raises(ExportError) as e:
        read_hf(hf)
    assert all(part in str(e.value) for part in field.split(" = ")), e.value


def test_importer_refuses_tensors_it_would_drop(tmp_path):
    from safetensors.torch import load_file, save_file

    from megatron_mobilellm.convert.hf_format import read_hf

    hf = tiny_hf(tmp_path / "hf")
    read_hf(hf)  # a plain Llama imports
    tensors = load_file(hf / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)  # a bias the config does not announce
    save_file(tensors, hf / "model.safetensors")
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_hf_to_checkpoint.py"), "--hf", str(hf),
                          "--output", str(tmp_path / "out")], capture_output=True, text=True, env=env())
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "q_proj.bias" in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_exporter_refuses_zero_checkpoint_without_fp32_masters(zero2_checkpoint, tmp_path):
    from megatron_mobilellm.checkpoint_layout import read_checkpoint

    save = shutil.copytree(zero2_checkpoint, tmp_path / "ckpt")
    for f in (save / "iter_0000002").glob("*optim_states.pt"):
        f.unlink()
    cmd = [sys.executable, str(ROOT / "tools" / "convert_checkpoint_to_hf.py"), "--checkpoint", str(save),
           "--output", str(tmp_path / "hf")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env())
    assert res.returncode == 1 and "without its optimizer files" in res.stderr and "--use-module-weights" in res.stderr
    assert not (tmp_path / "hf").exists()
    _, _, state = read_checkpoint(save, use_module_weights=True)
    assert state and all(v.dtype == torch.float32 for v in state.values())


@pytest.mark.parametrize("flag,value", [
    ("--lr", "nan"), ("--lr", "0"), ("--min-lr", "-0.00001"), ("--clip-grad", "inf"), ("--clip-grad", "-1"),
    ("--weight-decay", "nan"), ("--adam-beta1", "1.0"), ("--adam-beta2", "-0.1"), ("--adam-eps", "0"),
    ("--loss-spike-factor", "inf"), ("--exit-duration-in-mins", "nan"), ("--peak-tflops", "-5"),
    ("--lr-warmup-iters", "-1"), ("--lr-decay-iters", "0"), ("--lr-wsd-decay-iters", "-3"), ("--seed", "-1"),
    ("--seed", str(2**32)), ("--vocab-size", "0"), ("--exit-interval", "0"), ("--num-workers", "-1"),
    ("--eval-iters", "-1"), ("--keep-last", "0"), ("--max-skipped-steps", "0"),
])
def test_numeric_flags_are_finite_and_in_range(flag, value, tmp_path, capsys):
    from megatron_mobilellm.pretrain import main

    args = tiny_args(tmp_path / "unused", tmp_path, **{flag: value})
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and err[0].startswith(f"error: {flag} ") and "lie in" in err[0], err
