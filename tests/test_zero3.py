"""ZeRO-3 trains exactly like ZeRO-2: 2 ranks on CPU, fp32, the trainer's chunked loss, tied and untied embeddings.

Only the reduction order of gradients may differ between the stages, so losses and gradient norms must agree to
fp32 round-off. The shipped ``zero3.json`` keeps parameters below its persistence threshold whole on every rank,
which at the tiny preset would be all of them; the test lowers the threshold to 0 so that every parameter,
the tied embedding included, is partitioned, gathered for its uses and has its gradient reduce-scattered.
"""

import json
import subprocess
import sys

import pytest

from helpers import ROOT, read_scalars, run_pretrain, tiny_args

CORPUS_DOCS = 120
ITERS = 12


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
    assert zero2["train/loss"][ITERS] < zero2["train/loss"][1] - 0.1  # it trained, so the weights did move


def test_zero3_config_leaf_modules_name_our_block():
    """The shipped config fetches whole blocks only while its class names match the model's (a rename would
    silently fall back to per-Linear fetching)."""
    from deepspeed.utils import set_z3_leaf_modules

    from megatron_mobilellm.config import get_config
    from megatron_mobilellm.model import MobileLLM

    classes = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())["zero_optimization"]["leaf_module"]["classes"]
    model = MobileLLM(get_config("tiny"))
    assert set_z3_leaf_modules(model, classes) == list(model.decoder.layers)


def write_curve(tb_dir, values: dict[str, list[float]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tb_dir)) as w:
        for tag, curve in values.items():
            for step, v in enumerate(curve, start=1):
                w.add_scalar(tag, v, step)


def test_compare_losses_fails_above_rtol(tmp_path):
    write_curve(tmp_path / "a", {"train/loss": [5.0, 4.0], "train/grad_norm": [1.0, 2.0]})
    write_curve(tmp_path / "b", {"train/loss": [5.0, 4.0], "train/grad_norm": [1.0, 2.001]})
    cmd = [sys.executable, str(ROOT / "tools" / "compare_losses.py"), str(tmp_path / "a"), str(tmp_path / "b"),
           "--tag", "train/loss", "--tag", "train/grad_norm", "--rtol"]
    same = subprocess.run([*cmd, "1e-3"], capture_output=True, text=True)
    assert same.returncode == 0 and "train/grad_norm: 2 common iterations" in same.stdout
    differ = subprocess.run([*cmd, "1e-4"], capture_output=True, text=True)
    assert differ.returncode == 1 and differ.stderr.startswith("error: the runs differ by 0.0005 relative")


def test_zero_stage_table_pairs_same_shape_and_compile_mode(tmp_path):
    def bench(name, world, tok, preset="125M"):
        path = tmp_path / f"{name.replace(' ', '_')}_{world}_{preset}.json"
        row = {"name": name + (f" ×{world}" if world > 1 else ""), "preset": preset, "micro_batch": 16,
               "tokens_per_sec": tok, "peak_mem_gib": 20.0}
        path.write_text(json.dumps({"world_size": world, "rows": [row, {**row, "name": "transformers eager"}]}))
        return str(path)

    files = [bench("ours zero2", 2, 200_000.0), bench("ours zero3", 2, 150_000.0), bench("ours zero3", 1, 90_000.0),
             bench("ours blocks zero2", 2, 300_000.0), bench("ours blocks zero3", 2, 240_000.0),
             bench("ours zero3", 2, 10_000.0, preset="1B")]
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "zero_stage_table.py"), *files], capture_output=True,
                         text=True, check=True)
    rows = res.stdout.splitlines()[2:]
    assert len(rows) == 6
    assert "| 125M | 16 | 2 | eager | zero3 | 150,000 | 75 % | 20.0 |" in rows
    assert "| 125M | 16 | 2 | blocks | zero3 | 240,000 | 80 % | 20.0 |" in rows
    assert "| 125M | 16 | 1 | eager | zero3 | 90,000 | — | 20.0 |" in rows  # no 1-GPU ZeRO-2 row to pair with
    assert "| 1B | 16 | 2 | eager | zero3 | 10,000 | — | 20.0 |" in rows
