"""Every bad command line or DeepSpeed config fails before any expensive work, with a message naming the cause."""

import json

import pytest

from helpers import ROOT, tiny_args
from megatron_mobilellm import pretrain
from megatron_mobilellm.training.arguments import ConfigError, data_parallel_checks, parse_args
from megatron_mobilellm.training.ds_config import build_ds_config

CORPUS_DOCS = 50


def fails(argv, capsys, monkeypatch, world=None):
    if world:
        monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(SystemExit) as exc:
        pretrain.main(argv)
    assert exc.value.code != 0
    return capsys.readouterr().err


def test_global_batch_not_multiple_of_micro(corpus, tmp_path, capsys, monkeypatch):
    err = fails(tiny_args(corpus, tmp_path, **{"--global-batch-size": 7}), capsys, monkeypatch)
    assert "--global-batch-size 7 is not a multiple of --micro-batch-size 2" in err


def test_global_batch_not_divisible_by_data_parallel(corpus, tmp_path, capsys, monkeypatch):
    err = fails(tiny_args(corpus, tmp_path, **{"--global-batch-size": 6}), capsys, monkeypatch, world=2)
    assert "not divisible by --micro-batch-size 2 × 2 data-parallel ranks" in err


def test_seq_length_above_max_positions(corpus, tmp_path, capsys, monkeypatch):
    err = fails(tiny_args(corpus, tmp_path, **{"--seq-length": 4096}), capsys, monkeypatch)
    assert "--seq-length 4096 exceeds the model's max positions (256)" in err


def test_cuda_graphs_needs_compile_and_a_gpu(corpus, tmp_path, capsys, monkeypatch):
    err = fails(tiny_args(corpus, tmp_path, **{"--cuda-graphs": ""}), capsys, monkeypatch)
    assert "--cuda-graphs needs --compile" in err
    err = fails(tiny_args(corpus, tmp_path, **{"--cuda-graphs": "", "--compile": "decoder"}), capsys, monkeypatch)
    assert "--cuda-graphs needs a CUDA device" in err
    monkeypatch.setattr(pretrain.torch.cuda, "is_available", lambda: True)
    err = fails(tiny_args(corpus, tmp_path, zero=3, **{"--cuda-graphs": "", "--compile": "decoder"}), capsys,
                monkeypatch)
    assert "--cuda-graphs does not work with ZeRO-3" in err
    err = fails(tiny_args(corpus, tmp_path, **{"--cuda-graphs": "", "--compile": "decoder"}), capsys, monkeypatch)
    assert "--cuda-graphs needs one micro-batch per step, but --global-batch-size 8 means 4 micro-batches" in err


def test_missing_data_prefix(tmp_path, capsys, monkeypatch):
    err = fails(tiny_args(tmp_path / "nope", tmp_path), capsys, monkeypatch)
    assert f"{tmp_path / 'nope'}.idx: no such file" in err


def test_weight_without_prefix(corpus, tmp_path, capsys, monkeypatch):
    err = fails(tiny_args(corpus, tmp_path, **{"--data-path": f"0.5 {corpus} 0.5"}), capsys, monkeypatch)
    assert "weight '0.5' has no dataset prefix" in err


@pytest.mark.parametrize("key,value,flag", [
    ("train_micro_batch_size_per_gpu", 4, "--micro-batch-size"),
    ("gradient_accumulation_steps", 2, "--global-batch-size / (micro × DP)"),
    ("train_batch_size", 16, "--global-batch-size"),
    ("gradient_clipping", 0.5, "--clip-grad"),
])
def test_ds_config_disagreement(corpus, tmp_path, capsys, monkeypatch, key, value, flag):
    cfg = json.loads((ROOT / "ds_configs" / "zero1.json").read_text())
    cfg[key] = value
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    err = fails(tiny_args(corpus, tmp_path, **{"--deepspeed_config": path}), capsys, monkeypatch)
    assert f"{path}: {key} = {value!r} disagrees with {flag}" in err


def test_ds_config_precision_disagreement(corpus, tmp_path, capsys, monkeypatch):
    cfg = json.loads((ROOT / "ds_configs" / "zero1.json").read_text())
    cfg["bf16"] = {"enabled": True}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    err = fails(tiny_args(corpus, tmp_path, **{"--deepspeed_config": path, "--fp32": ""}), capsys, monkeypatch)
    assert "bf16.enabled = True disagrees with the command line's precision (fp32" in err


def test_ds_config_missing_or_invalid(corpus, tmp_path, capsys, monkeypatch):
    err = fails(tiny_args(corpus, tmp_path, **{"--deepspeed_config": tmp_path / "none.json"}), capsys, monkeypatch)
    assert "none.json: no such file" in err
    (tmp_path / "bad.json").write_text("{")
    err = fails(tiny_args(corpus, tmp_path, **{"--deepspeed_config": tmp_path / "bad.json"}), capsys, monkeypatch)
    assert "bad.json: invalid JSON" in err


@pytest.mark.parametrize("content,message", [
    ("[]", "the DeepSpeed config must be a JSON object, not a list (--deepspeed_config {path})"),
    ('{"bf16": true}', '"bf16" must be a section (a JSON object), not true (--deepspeed_config {path})'),
    ('{"zero_optimization": 2}',
     '"zero_optimization" must be a section (a JSON object), not 2 (--deepspeed_config {path})'),
    (None, "the DeepSpeed config is a folder, not a JSON file (--deepspeed_config {path})"),
])
def test_ds_config_of_the_wrong_shape(corpus, tmp_path, capsys, monkeypatch, content, message):
    path = tmp_path / "ds.json"
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)
    err = fails(tiny_args(corpus, tmp_path, **{"--deepspeed_config": path}), capsys, monkeypatch)
    assert err.strip().splitlines() == [f"error: {message.format(path=path)}"]


def test_ds_config_fills_auto_fields():
    cfg = build_ds_config(str(ROOT / "ds_configs" / "zero2.json"), 4, 2, 8, 1.0, True)
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_batch_size"] == 64 and cfg["gradient_clipping"] == 1.0 and cfg["bf16"]["enabled"] is True
    assert data_parallel_checks(parse_args(tiny_args(ROOT / "x", ROOT, **{"--global-batch-size": 64})), 4) == 8
    with pytest.raises(ConfigError):
        data_parallel_checks(parse_args(tiny_args(ROOT / "x", ROOT, **{"--global-batch-size": 6})), 2)
