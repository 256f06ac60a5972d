"""The fused bf16 overflow check and gradient norm answer as DeepSpeed's own per-gradient versions, on a real
ZeRO-1/2 engine."""

import subprocess
import sys

import pytest

from helpers import ROOT, env, setup_keyword

SCRIPT = r"""
import sys
import torch
from megatron_mobilellm.config import get_config
from megatron_mobilellm.training.config import EngineConfig, OptimizerConfig, ScheduleConfig
from megatron_mobilellm.training.distributed import init_distributed
from megatron_mobilellm.training.ds_config import build_ds_config
from megatron_mobilellm.training.engine import build_engine
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

zero = sys.argv[1]
device = init_distributed()
cfg = get_config("tiny")
schedule = ScheduleConfig(lr=5e-4, min_lr=5e-5, warmup_iters=1000, decay_iters=10, style="cosine", wsd_decay_iters=2)
engine, _, _ = build_engine(cfg, EngineConfig(), OptimizerConfig(), schedule, device,
                            build_ds_config(f"ds_configs/zero{zero}.json", 2, 1, 1, 1.0, True))
opt = engine.optimizer
original = lambda: DeepSpeedZeroOptimizer.has_overflow_partitioned_grads_serial(opt)
assert opt.has_overflow_partitioned_grads_serial.__qualname__.startswith("fuse_overflow_check"), "not installed"
assert opt.get_grad_norm_direct.__qualname__.startswith("fuse_grad_norm"), "not installed"
norms = lambda i: (opt.get_grad_norm_direct(opt.averaged_gradients[i], opt.params_in_partition[i]),
                   DeepSpeedZeroOptimizer.get_grad_norm_direct(opt, opt.averaged_gradients[i],
                                                               opt.params_in_partition[i]))
tokens = torch.randint(0, cfg.vocab_size, (2, 32))
engine.backward(engine(tokens, tokens))
grads = [g for i in range(len(opt.bit16_groups)) for g in opt.averaged_gradients[i] if g is not None]
assert grads
for i in range(len(opt.bit16_groups)):
    fused, ref = norms(i)
    assert fused.dtype == ref.dtype and fused.shape == ref.shape and fused > 0, (fused, ref)
    assert abs(fused.item() - ref.item()) <= 1e-6 * ref.item(), (fused.item(), ref.item())
results = []
for bad in (None, float("nan"), float("inf"), float("-inf")):
    if bad is not None:
        grads[len(grads) // 2].view(-1)[3] = bad
    fused, ref = opt.has_overflow_partitioned_grads_serial(), original()
    assert fused.shape == ref.shape and fused.dtype == ref.dtype, (fused, ref)
    results.append((bool(fused), bool(ref)))
print(results)
assert results == [(False, False), (True, True), (True, True), (True, True)], results
bad_norms = [norms(i) for i in range(len(opt.bit16_groups))]
assert any(f.item() == r.item() == -1.0 for f, r in bad_norms), bad_norms  # non-finite: DeepSpeed's -1 mark
"""


@pytest.mark.parametrize("zero", [1, 2])
def test_fused_overflow_check_and_grad_norm_match_deepspeed(zero):
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(zero)], capture_output=True, text=True, env=env(),
                         cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]


UNTESTED_VERSION = r"""
import warnings
import deepspeed
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from megatron_mobilellm.config import get_config
from megatron_mobilellm.training.config import EngineConfig, OptimizerConfig, ScheduleConfig
from megatron_mobilellm.training.distributed import init_distributed
from megatron_mobilellm.training.ds_config import build_ds_config
from megatron_mobilellm.training.engine import build_engine

deepspeed.__version__ = "0.20.1"  # a release the patch was never tested with
device = init_distributed()
schedule = ScheduleConfig(lr=5e-4, min_lr=5e-5, warmup_iters=1000, decay_iters=10, style="cosine", wsd_decay_iters=2)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    engine, _, _ = build_engine(get_config("tiny"), EngineConfig(), OptimizerConfig(), schedule, device,
                                build_ds_config("ds_configs/zero2.json", 2, 1, 1, 1.0, True))
assert isinstance(engine.optimizer, DeepSpeedZeroOptimizer)
assert "has_overflow_partitioned_grads_serial" not in vars(engine.optimizer), "patched anyway"
assert "get_grad_norm_direct" not in vars(engine.optimizer), "patched anyway"
print([str(w.message) for w in caught if "outside the tested range" in str(w.message)])
"""


def test_untested_deepspeed_keeps_its_own_reductions_with_a_warning():
    res = subprocess.run([sys.executable, "-c", UNTESTED_VERSION], capture_output=True, text=True, env=env(),
                         cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "DeepSpeed 0.20.1 is outside the tested range <0.20,>=0.19.8" in res.stdout


def test_setup_pins_the_tested_deepspeed_range():
    from packaging.requirements import Requirement

    from megatron_mobilellm.training.zero_overflow import TESTED_DEEPSPEED

    pins = [Requirement(r) for r in setup_keyword("install_requires") if Requirement(r).name == "deepspeed"]
    assert [r.specifier for r in pins] == [TESTED_DEEPSPEED]
