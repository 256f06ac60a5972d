"""The deferred overflow check (``zero_overflow.defer_overflow_sync``) trains exactly as DeepSpeed's own step: the
same weights after every step, the same skipped step, LR schedule, skip count and gradient norm, on a real
ZeRO-1/2 engine with the fused torch AdamW (on CPU here; the CUDA kernel takes the same ``found_inf``)."""

import subprocess
import sys

import pytest

from helpers import ROOT, env

SCRIPT = r"""
import sys
import deepspeed
import torch
from megatron_mobilellm.config import get_config
from megatron_mobilellm.model import MobileLLM
from megatron_mobilellm.training.config import ScheduleConfig
from megatron_mobilellm.training.distributed import init_distributed
from megatron_mobilellm.training.ds_config import build_ds_config
from megatron_mobilellm.training.lr_scheduler import LRScheduler
from megatron_mobilellm.training.optimizer import param_groups
from megatron_mobilellm.training.zero_overflow import defer_overflow_sync, fuse_grad_norm, fuse_overflow_check

zero = sys.argv[1]
device = init_distributed()
cfg = get_config("tiny")
schedule = ScheduleConfig(lr=5e-3, min_lr=5e-4, warmup_iters=2, decay_iters=6, style="cosine", wsd_decay_iters=2)


def engine(deferred: bool):
    torch.manual_seed(0)
    model = MobileLLM(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(param_groups(model, 0.1, True), lr=schedule.lr, fused=True)
    eng, _, _, sched = deepspeed.initialize(model=model, optimizer=optimizer,
                                            config=build_ds_config(f"ds_configs/zero{zero}.json", 2, 1, 1, 1.0, True),
                                            lr_scheduler=lambda opt: LRScheduler(opt, schedule))
    fuse_overflow_check(eng.optimizer)
    fuse_grad_norm(eng.optimizer)
    if deferred:
        defer_overflow_sync(eng.optimizer)
        assert eng.optimizer.step.__qualname__.startswith("defer_overflow_sync"), "not installed"
        assert not eng.optimizer.check_grad_overflow
    return eng, sched


stock, deferred = engine(False), engine(True)
assert not stock[0].optimizer.step.__qualname__.startswith("defer_overflow_sync")
g = torch.Generator().manual_seed(1)
batches = [torch.randint(0, cfg.vocab_size, (2, 33), generator=g) for _ in range(5)]
history = {}
for name, (eng, sched) in (("stock", stock), ("deferred", deferred)):
    rows = []
    for i, batch in enumerate(batches):
        loss = eng(batch[:, :-1], batch[:, 1:])
        if i in (1, 2):  # two bad steps in a row: nothing may change, twice
            loss = loss * float("nan")
        eng.backward(loss)
        eng.step()
        weights = torch.cat([p.detach().float().flatten() for p in eng.module.parameters()])
        rows.append((loss.item(), eng.was_step_applied(), sched.get_last_lr()[0], eng.skipped_steps,
                     float(eng.get_global_grad_norm()), weights))
    history[name] = rows
for i, (a, b) in enumerate(zip(history["stock"], history["deferred"])):
    assert a[:4] == b[:4] or (a[0] != a[0] and b[0] != b[0] and a[1:4] == b[1:4]), (i, a[:5], b[:5])
    assert a[4] == b[4], (i, a[4], b[4])
    assert torch.equal(a[5], b[5]), f"weights differ after step {i}"
applied = [r[1] for r in history["deferred"]]
assert applied == [True, False, False, True, True], applied
assert not torch.equal(history["deferred"][0][5], history["deferred"][3][5])  # the good steps did train
print("ok", applied, [r[4] for r in history["deferred"]])
"""


@pytest.mark.parametrize("zero", [1, 2])
def test_deferred_overflow_check_trains_like_deepspeeds_step(zero):
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(zero)], capture_output=True, text=True, env=env(),
                         cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "ok [True, False, False, True, True]" in res.stdout


NOT_APPLIED = r"""
import torch
from megatron_mobilellm.config import get_config
from megatron_mobilellm.training.config import EngineConfig, OptimizerConfig, ScheduleConfig
from megatron_mobilellm.training.distributed import init_distributed
from megatron_mobilellm.training.ds_config import build_ds_config
from megatron_mobilellm.training.engine import build_engine

device = init_distributed()
schedule = ScheduleConfig(lr=5e-4, min_lr=5e-5, warmup_iters=10, decay_iters=100, style="cosine", wsd_decay_iters=2)
for clip, fp in ((1.0, "bf16"), (0.0, "bf16"), (1.0, "fp32")):
    engine, _, _ = build_engine(get_config("tiny"), EngineConfig(), OptimizerConfig(), schedule, device,
                                build_ds_config("ds_configs/zero1.json", 2, 1, 1, clip, fp == "bf16"))
    # the trainer's CPU optimizer is the unfused AdamW (no found_inf), so DeepSpeed keeps its own step
    assert "step" not in vars(engine.optimizer) and engine.optimizer.check_grad_overflow == (fp == "bf16"), (clip, fp)
print("ok")
"""


def test_optimizers_without_found_inf_keep_deepspeeds_step():
    res = subprocess.run([sys.executable, "-c", NOT_APPLIED], capture_output=True, text=True, env=env(), cwd=ROOT,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
