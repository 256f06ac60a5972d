"""Training-step throughput of our DeepSpeed engine vs transformers' LlamaForCausalLM, in the same process.

    python -m megatron_mobilellm.benchmark --presets 125M 350M --micro-batch-sizes 16 --compile \\
        --baseline eager compile --json bench.json

Under ``deepspeed --num_gpus N --module megatron_mobilellm.benchmark`` every rank runs our step on its own
micro-batch (global batch = micro-batch × N, gradients all-reduced by the ZeRO stage of the config) and the table
gives tokens/s per GPU, so that the 1-GPU and N-GPU rows read as weak scaling; the transformers baseline runs only
in a single-process benchmark.

Each configuration times full training steps (forward, backward, optimizer step; ours through DeepSpeed with bf16
and fp32 master weights, the baseline with bf16 autocast and fused AdamW) on random tokens, after warm-up steps,
with a device synchronisation around every step, and reports the median. MFU uses the trainer's FLOP count
(6·N_matmul + 12·L·d·s per token) and the GPU's dense bf16 peak. Runs on CPU with the ``tiny`` preset as a smoke
test (times are then meaningless).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_mobilellm.config import PRESETS, ModelConfig, get_config
from megatron_mobilellm.model.hf_adapter import hf_config_dict
from megatron_mobilellm.training.arguments import add_engine_arguments, engine_config
from megatron_mobilellm.training.config import OPTIMIZERS, EngineConfig, OptimizerConfig, ScheduleConfig
from megatron_mobilellm.training.distributed import init_distributed
from megatron_mobilellm.training.ds_config import build_ds_config
from megatron_mobilellm.training.engine import build_engine, check_cuda_graphs
from megatron_mobilellm.training.metrics import achieved_tflops, detect_peak_tflops, flops_per_token


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device: torch.device, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def random_batch(cfg: ModelConfig, micro: int, seq: int, device: torch.device, seed: int = 0):
    seed += dist.get_rank() if dist.is_initialized() else 0
    g = torch.Generator(device).manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (micro, seq + 1), device=device, generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def ours(preset: str, micro: int, seq: int, device: torch.device, opts: argparse.Namespace) -> tuple:
    cfg = get_config(preset)
    ds_config = build_ds_config(opts.deepspeed_config, micro, 1, dist.get_world_size(), 1.0, device.type == "cuda")
    check_cuda_graphs(opts.cuda_graphs, ds_config, opts.deepspeed_config)
    # Any valid schedule will do: only the step time is measured.
    schedule = ScheduleConfig(lr=5e-4, min_lr=5e-5, warmup_iters=10, decay_iters=1000, style="cosine",
                              wsd_decay_iters=200)
    engine, _, _ = build_engine(cfg, engine_config(opts), OptimizerConfig(optimizer=opts.optimizer), schedule, device,
                                ds_config)
    tokens, labels = random_batch(cfg, micro, seq, device)

    def step() -> None:
        engine.backward(engine(tokens, labels))
        engine.step()

    return cfg, step, engine


def transformers_baseline(preset: str, micro: int, seq: int, device: torch.device, compiled: bool) -> tuple:
    import transformers

    cfg = ModelConfig(**PRESETS[preset])
    hf_cfg = transformers.LlamaConfig(**hf_config_dict(cfg), attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf_cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    forward = torch.compile(model) if compiled else model
    tokens, labels = random_batch(cfg, micro, seq, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = forward(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    del labels
    return cfg, step, model


def ours_label(opts: argparse.Namespace, world: int) -> str:
    """E.g. ``ours decoder+graphs zero1 ×2``: what differs from the plain eager single-GPU run."""
    parts = [Path(opts.deepspeed_config).stem]
    if opts.compile:
        parts.insert(0, opts.compile + ("+graphs" if opts.cuda_graphs else ""))
    parts += [a for a, default in ((opts.attention_backend, "auto"), (opts.optimizer, "torch_adamw")) if a != default]
    parts += [f"×{world}"] if world > 1 else []
    return " ".join(["ours", *parts])


def measure(name: str, preset: str, micro: int, seq: int, device: torch.device, build, opts) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        cfg, step, keep = build()
        times = time_steps(step, device, opts.warmup, opts.steps)
        if opts.profile and name.startswith("ours"):
            profile(step, device, opts.trace)
    except torch.OutOfMemoryError:
        return {"name": name, "preset": preset, "micro_batch": micro, "error": "out of memory"}
    median = statistics.median(times)
    tokens_per_sec = micro * seq / median
    peak = opts.peak_tflops or detect_peak_tflops(device)
    tflops, mfu = achieved_tflops(tokens_per_sec, flops_per_token(cfg, seq), peak)
    row = {"name": name, "preset": preset, "micro_batch": micro, "seq_length": seq, "step_ms": 1000 * median,
           "tokens_per_sec": tokens_per_sec, "tflops": tflops, "mfu": mfu,
           "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    del keep, step
    gc.collect()
    return row


def profile(step, device: torch.device, trace: str | None) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync(device)
    if dist.get_rank() != 0:
        return
    if trace:
        prof.export_chrome_trace(trace)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60))


def print_table(rows: list[dict]) -> None:
    if dist.get_rank() != 0:
        return
    print(f"\n{'config':<44}{'preset':>7}{'mb':>4}{'step ms':>10}{'tok/s':>11}{'TFLOP/s':>9}{'MFU':>7}"
          f"{'mem GiB':>9}{'vs base':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<44}{r['preset']:>7}{r['micro_batch']:>4}  {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        ratio = f"{r['vs_baseline']:.2f}x" if r.get("vs_baseline") else "-"
        print(f"{r['name']:<44}{r['preset']:>7}{r['micro_batch']:>4}{r['step_ms']:>10.1f}{r['tokens_per_sec']:>11,.0f}"
              f"{r['tflops']:>9.1f}{mfu:>7}{mem:>9}{ratio:>9}")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["125M"])
    p.add_argument("--micro-batch-sizes", nargs="+", type=int, default=[16])
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--deepspeed_config", default="ds_configs/zero2.json")
    p.add_argument("--optimizer", default=OptimizerConfig.optimizer, choices=OPTIMIZERS)
    p.add_argument("--seed", type=int, default=EngineConfig.seed, help="ours: weight initialisation")
    add_engine_arguments(p.add_argument_group("ours: the trainer's engine flags"))
    p.add_argument("--baseline", nargs="*", default=["eager", "compile"], choices=["eager", "compile"],
                   help="transformers baselines to run in the same process (none: pass the flag alone)")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--profile", action="store_true", help="print the top GPU kernels of 3 of our steps")
    p.add_argument("--trace", default=None, help="with --profile: also write a Chrome trace here (.json or .json.gz)")
    opts = p.parse_args(argv)

    device = init_distributed()
    world = dist.get_world_size()
    if world > 1 and opts.baseline:
        opts.baseline = []  # the baseline is single-GPU; compare against a 1-process run of this benchmark
    label = ours_label(opts, world)
    rows = []
    for preset in opts.presets:
        for micro in opts.micro_batch_sizes:
            seq = min(opts.seq_length, PRESETS[preset].get("max_position_embeddings", 2048))
            row = measure(label, preset, micro, seq, device, lambda: ours(preset, micro, seq, device, opts), opts)
            base_rows = [measure(f"transformers {kind}", preset, micro, seq, device,
                                 lambda kind=kind: transformers_baseline(preset, micro, seq, device,
                                                                         kind == "compile"), opts)
                         for kind in opts.baseline]
            best = max((r["tokens_per_sec"] for r in base_rows if "error" not in r), default=None)
            if best and "error" not in row:
                row["vs_baseline"] = row["tokens_per_sec"] / best
            rows += [row, *base_rows]
            print_table(rows[-1 - len(base_rows):])
    print_table(rows)
    if opts.json and dist.get_rank() == 0:
        with open(opts.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                       "torch": torch.__version__, "world_size": world, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
