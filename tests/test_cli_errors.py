"""Bad input to any CLI ends with one ``error: <what> (<path or flag>)`` line and exit status 1 — no traceback, nothing
written — through the one mechanism in ``megatron_mobilellm.errors`` (``MOBILELLM_DEBUG=1`` shows the traceback).
Checks that can run before expensive work do: a checkpoint of another model or ZeRO stage is refused before
DeepSpeed loads it."""

import json
import runpy
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, env, read_scalars, run_pretrain, tiny_args

CORPUS_DOCS = 60


@pytest.fixture(scope="module")
def ckpt(corpus, tmp_path_factory):
    """A finished ZeRO-0 run (2 iterations) with its Hugging Face export (no tokenizer)."""
    work = tmp_path_factory.mktemp("run")
    run_pretrain(tiny_args(corpus, work, iters=2, zero=0, **{"--save": work / "ckpt", "--eval-iters": 0}))
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint_to_hf.py"), "--checkpoint",
                          str(work / "ckpt"), "--output", str(work / "hf"), "--dtype", "fp32"],
                         capture_output=True, text=True, env=env(), cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return work


def one_line_error(capsys, tool: str, *args) -> str:
    """Run ``tools/<tool>`` in this process as its shell entry would; return its single stderr line."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", [tool, *map(str, args)])
        with pytest.raises(SystemExit) as exc:
            runpy.run_path(str(ROOT / "tools" / tool), run_name="__main__")
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def copy_tree(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_generate_bad_inputs(ckpt, tmp_path, capsys):
    c = ckpt / "ckpt"
    (tmp_path / "bad.model").write_bytes(b"not a sentencepiece model")
    cases = [
        (["--checkpoint", c, "--prompt-ids", "1 2", "--top-p", "0"], "top-p must be in (0, 1] (--top-p 0.0)"),
        (["--checkpoint", c, "--prompt-ids", "1 2", "--temperature", "-1"], "(--temperature -1.0)"),
        (["--checkpoint", c, "--prompt-ids", "1 99999"], "token ids [99999] are outside the vocabulary [0, 512)"),
        (["--checkpoint", c, "--prompt-ids", "-3"], "token ids [-3] are outside the vocabulary"),
        (["--checkpoint", c, "--prompt-ids", ""], "no token ids given (--prompt-ids)"),
        (["--checkpoint", c, "--prompt-ids", "1 x"], "token ids must be integers"),
        (["--checkpoint", c, "--prompt", "hi", "--tokenizer-model", tmp_path / "bad.model"],
         "not a SentencePiece model"),
        (["--hf", ckpt / "hf", "--prompt", "hi"], "the export has no tokenizer"),
        (["--hf", "no-such-org/no-such-model", "--prompt-ids", "1"],
         "not a Hugging Face model folder (no config.json) (--hf no-such-org/no-such-model)"),
    ]
    for args, expected in cases:
        assert expected in one_line_error(capsys, "generate.py", *args), args


def test_converters_bad_inputs(ckpt, tmp_path, capsys):
    latest_binary = copy_tree(ckpt / "ckpt", tmp_path / "binary_latest")
    (latest_binary / "latest").write_bytes(b"\x80\x04\x95\x00\xff")
    assert "'latest' does not name a checkpoint tag" in one_line_error(
        capsys, "convert_checkpoint_to_hf.py", "--checkpoint", latest_binary, "--output", tmp_path / "o1")

    no_key = copy_tree(ckpt / "hf", tmp_path / "no_key")
    cfg = json.loads((no_key / "config.json").read_text())
    del cfg["hidden_size"]
    (no_key / "config.json").write_text(json.dumps(cfg))
    assert "config.json has no usable 'hidden_size' entry" in one_line_error(
        capsys, "convert_hf_to_checkpoint.py", "--hf", no_key, "--output", tmp_path / "o2")

    (no_key / "config.json").write_text("[]")
    assert "config.json has no usable" in one_line_error(
        capsys, "convert_hf_to_checkpoint.py", "--hf", no_key, "--output", tmp_path / "o3")

    from safetensors.torch import load_file, save_file

    no_tensor = copy_tree(ckpt / "hf", tmp_path / "no_tensor")
    tensors = load_file(str(no_tensor / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(no_tensor / "model.safetensors"))
    assert "the weights have no tensor 'model.layers.1.mlp.up_proj.weight'" in one_line_error(
        capsys, "convert_hf_to_checkpoint.py", "--hf", no_tensor, "--output", tmp_path / "o4")

    wrong_shape = copy_tree(ckpt / "hf", tmp_path / "wrong_shape")
    tensors = load_file(str(wrong_shape / "model.safetensors"))
    tensors["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"][:, :-1].clone()
    save_file(tensors, str(wrong_shape / "model.safetensors"))
    assert "tensor decoder.layers.0.mlp.linear_fc2.weight has shape" in one_line_error(
        capsys, "convert_hf_to_checkpoint.py", "--hf", wrong_shape, "--output", tmp_path / "o5")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_pretrain_refuses_another_model_or_zero_stage_before_loading(corpus, ckpt, tmp_path):
    load = copy_tree(ckpt / "ckpt", tmp_path / "ckpt")
    common = {"--load": load, "--save": load, "--eval-iters": 0}
    res = run_pretrain(tiny_args(corpus, tmp_path, iters=4, zero=0, **common, **{"--vocab-size": 1024}),
                       check=False)
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [
        f"error: checkpoint iter_0000002 holds another model (vocab_size 512 → 1024); use its --model-size and "
        f"model flags, or another --load (--load {load})"]
    assert "world size" not in res.stdout  # refused before any process group or engine existed
    res = run_pretrain(tiny_args(corpus, tmp_path, iters=4, zero=2, **common), check=False)
    assert res.returncode == 1 and "error: checkpoint iter_0000002 was saved under ZeRO-0, this run uses ZeRO-2" \
        in res.stderr and "Traceback" not in res.stderr


def test_damaged_latest_falls_back_and_a_damaged_manifest_stops(corpus, ckpt, tmp_path):
    load = copy_tree(ckpt / "ckpt", tmp_path / "latest")
    (load / "latest").write_bytes(b"\x80\x04\x95\x00\xff")
    res = run_pretrain(tiny_args(corpus, tmp_path, iters=3, zero=0, **{"--load": load, "--eval-iters": 0}))
    assert "does not name a checkpoint tag" in res.stdout and "resumed from" in res.stdout
    assert "Traceback" not in res.stderr
    load = copy_tree(ckpt / "ckpt", tmp_path / "manifest")
    (load / "iter_0000002" / "manifest.json").write_text("[]")
    res = run_pretrain(tiny_args(corpus, tmp_path, iters=3, zero=0, **{"--load": load, "--eval-iters": 0}),
                       check=False)  # the only tag is damaged: an error naming it, never a silent fresh start
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert last.startswith("error: --load ") and "iter_0000002: unreadable manifest" in last
    assert "--override-invalid-checkpoints" in last and (load / "iter_0000002").is_dir()


def test_debug_switch_shows_the_traceback(ckpt):
    args = [sys.executable, str(ROOT / "tools" / "generate.py"), "--checkpoint", str(ckpt / "ckpt"), "--prompt-ids",
            "1", "--top-p", "0"]
    quiet = subprocess.run(args, capture_output=True, text=True, env=env(), cwd=ROOT)
    loud = subprocess.run(args, capture_output=True, text=True, env={**env(), "MOBILELLM_DEBUG": "1"}, cwd=ROOT)
    assert quiet.returncode == 1 and quiet.stderr.strip().splitlines() == [
        "error: top-p must be in (0, 1] (--top-p 0.0)"]
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "ConfigError: top-p must be in" in loud.stderr


def test_zero0_fp32_logs_the_true_global_grad_norm(corpus, tmp_path):
    """DeepSpeed keeps no gradient norm under ZeRO-0 in fp32; the logged one is the norm before clipping, the same
    DeepSpeed's ZeRO-2 reports for the same step (same data, same initial weights)."""
    norms = {}
    for zero in (0, 2):
        tb = tmp_path / f"tb{zero}"
        run_pretrain(tiny_args(corpus, tmp_path, iters=1, zero=zero,
                               **{"--eval-iters": 0, "--clip-grad": 0.05, "--tensorboard-dir": tb}))
        norms[zero] = read_scalars(tb)["train/grad_norm"][1]
    assert norms[0] > 0.05 and norms[0] == pytest.approx(norms[2], rel=1e-4), norms


@pytest.mark.parametrize("tool, args, line", [
    ("preprocess_jsonl.py", ["--input", "x"], "error: the following arguments are required: --output-prefix; "
                                              "see --help"),
    ("convert_checkpoint_to_hf.py", ["--checkpoint", "c", "--output", "o", "--dtype", "fp8"],
     "error: invalid choice: 'fp8' (choose from 'bf16', 'fp16', 'fp32') (--dtype); see --help"),
    ("generate.py", ["--hf", "h", "--max-new-tokens", "many"], "error: invalid int value: 'many' (--max-new-tokens); "
                                                             "see --help"),
    ("evaluate.py", ["--hf", "h", "--bogus"], "error: unrecognized arguments: --bogus; see --help"),
    ("export_ondevice.py", ["--hf"], "error: expected one argument (--hf); see --help"),
])
def test_a_bad_command_line_is_one_line_and_exit_1(capsys, tool, args, line):
    assert one_line_error(capsys, tool, *args) == line


def test_pretrain_command_line_is_one_line_and_exit_1(capsys):
    from megatron_mobilellm import pretrain

    with pytest.raises(SystemExit) as exc:
        pretrain.main(["--model-size", "huge"])
    assert exc.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: invalid choice: 'huge' (choose from")
