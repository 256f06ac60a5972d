"""Training-step throughput of our DeepSpeed engine vs transformers' LlamaForCausalLM, each in a fresh process.

    python -m megatron_mobilellm.benchmark --presets 125M 350M --micro-batch-sizes 16 32 \\
        --compile decoder --cuda-graphs --deepspeed_config ds_configs/zero1.json --json bench.json

For every preset and micro-batch the command starts one subprocess per configuration, one after another: ours,
then each transformers baseline of ``--baseline`` (eager, ``torch.compile``, Liger-kernel; see
``megatron_mobilellm.benchmark_baselines``). Nothing compiled, cached or allocated by one configuration can slow
down or speed up the next (a baseline timed in-process after our compiled model measured ~45 % slower than in a
fresh process). One table follows: tokens/s, MFU, peak memory, and ours ÷ the best baseline; a configuration that
ran out of memory or is not installed is a row saying so, and one whose process failed is a row too, after which
the command exits 1. ``--run KIND`` times one configuration in this process (what each subprocess does).

Under ``deepspeed --num_gpus N --module megatron_mobilellm.benchmark`` every rank runs our step in-process on its
own micro-batch (global batch = micro-batch × N, gradients all-reduced by the ZeRO stage of the config) and the
table gives tokens/s per GPU, so that the 1-GPU and N-GPU rows read as weak scaling; baselines are single-GPU.

Timing rule, the same for every configuration: full training steps (forward, backward, optimizer step; ours through
DeepSpeed with bf16 and fp32 master weights, the baselines with bf16 autocast and fused AdamW, all with gradient
clipping) on random tokens, ``--warmup`` steps first, then ``--steps`` steps each with a device synchronisation
around it; the median step. MFU uses the trainer's FLOP count (6·N_matmul + 12·L·d·s per token) and the GPU's
dense bf16 peak. Runs on CPU with the ``tiny`` preset as a smoke test (times are then meaningless).

Diagnosis of our step: ``--profile`` (the top GPU kernels of 3 steps; ``--trace`` also writes a Chrome trace) and
``--sync-debug`` (every host-device synchronisation in the timed steps, with its Python stack: each one lets the
GPU run dry while the host catches up).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_mobilellm.atomic import atomic_file
from megatron_mobilellm.benchmark_baselines import BASELINES, BaselineUnavailable, transformers_step
from megatron_mobilellm.config import PRESETS, ModelConfig, get_config
from megatron_mobilellm.errors import ArgumentParser, ConfigError
from megatron_mobilellm.training.arguments import add_engine_arguments, engine_config
from megatron_mobilellm.training.config import OPTIMIZERS, EngineConfig, OptimizerConfig, ScheduleConfig
from megatron_mobilellm.training.distributed import exit_without_teardown, init_distributed
from megatron_mobilellm.training.ds_config import build_ds_config
from megatron_mobilellm.training.engine import build_engine, check_cuda_graphs
from megatron_mobilellm.training.metrics import achieved_tflops, detect_peak_tflops, flops_per_token
from megatron_mobilellm.training.zero_overflow import restore_stock

LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device: torch.device, warmup: int, steps: int, sync_debug: bool = False) -> list[float]:
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    with report_host_syncs(steps, device) if sync_debug else contextlib.nullcontext():
        for _ in range(steps):
            t = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - t)
    return times


SYNC_WARNING = "called a synchronizing CUDA operation"  # what torch's sync-debug mode "warn" says at each sync


@contextlib.contextmanager
def report_host_syncs(steps: int, device: torch.device):
    """Print every place that made the host wait for the GPU (``.item()``, ``bool()`` of a device tensor, a copy
    to the host...) inside the block, with how often per step and the Python stack that got there: while the host
    waits it issues no work, and the GPU runs dry once its queue is empty. Explicit waits (the benchmark's own
    synchronisation after each timed step, ``Event.synchronize``) are not counted."""
    if device.type != "cuda":
        yield
        print(f"host syncs: not measured on {device.type} (CUDA only)")
        return
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with collect_sync_warnings() as seen:
            yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print(format_sync_report(seen, steps))


@contextlib.contextmanager
def collect_sync_warnings():
    """Count the sync-debug warnings raised inside the block by (message, innermost Python frames); other warnings
    go on as usual."""
    seen: dict[tuple[str, tuple[str, ...]], int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        show = warnings.showwarning

        def record(message, category, filename, lineno, file=None, line=None) -> None:
            text = str(message)
            if SYNC_WARNING not in text:
                return show(message, category, filename, lineno, file, line)
            frames = [f for f in traceback.extract_stack()[:-1] if f.filename not in (__file__, warnings.__file__)]
            key = (text.split("\n")[0], tuple(f"{f.filename}:{f.lineno} {f.name}" for f in frames[-5:]))
            seen[key] = seen.get(key, 0) + 1

        warnings.showwarning = record
        yield seen


def format_sync_report(seen: dict[tuple[str, tuple[str, ...]], int], steps: int) -> str:
    steps = max(steps, 1)
    lines = [f"host syncs in {steps} timed steps: {sum(seen.values())} ({sum(seen.values()) / steps:.1f} per step)"]
    for (message, frames), count in sorted(seen.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {count / steps:.1f} per step: {message}")
        lines += [f"      {frame}" for frame in frames]
    return "\n".join(lines)


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
    if opts.stock_zero_reductions:
        restore_stock(engine.optimizer)
    tokens, labels = random_batch(cfg, micro, seq, device)

    def step() -> None:
        engine.backward(engine(tokens, labels))
        engine.step()

    return cfg, step, engine


def sequence_length(preset: str, opts: argparse.Namespace) -> int:
    return min(opts.seq_length, PRESETS[preset].get("max_position_embeddings", 2048))


def baseline(kind: str, preset: str, micro: int, seq: int, device: torch.device) -> tuple:
    cfg = get_config(preset)
    tokens, _ = random_batch(cfg, micro, seq, device)
    step, model = transformers_step(kind, cfg, tokens, device)
    return cfg, step, model


def ours_label(opts: argparse.Namespace, world: int) -> str:
    """E.g. ``ours decoder+graphs zero1 ×2``: what differs from the plain eager single-GPU run."""
    parts = [Path(opts.deepspeed_config).stem]
    if opts.compile:
        parts.insert(0, opts.compile + ("+graphs" if opts.cuda_graphs else ""))
    parts += [a for a, default in ((opts.attention_backend, "auto"), (opts.optimizer, "torch_adamw")) if a != default]
    parts += ["recompute"] if opts.recompute_activations else []
    parts += ["stock-reductions"] if opts.stock_zero_reductions else []
    parts += [f"×{world}"] if world > 1 else []
    return " ".join(["ours", *parts])


def run_label(kind: str, opts: argparse.Namespace, world: int) -> str:
    return ours_label(opts, world) if kind == "ours" else f"transformers {kind}"


def measure(kind: str, preset: str, micro: int, seq: int, device: torch.device, opts) -> dict:
    """Time one configuration in this process: a table row (with ``error`` when it could not run)."""
    name = run_label(kind, opts, dist.get_world_size())
    row = {"name": name, "kind": kind, "preset": preset, "micro_batch": micro, "seq_length": seq, "pid": os.getpid()}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        if kind == "ours":
            cfg, step, keep = ours(preset, micro, seq, device, opts)
        else:
            cfg, step, keep = baseline(kind, preset, micro, seq, device)
        times = time_steps(step, device, opts.warmup, opts.steps, opts.sync_debug)
        if opts.profile:
            profile(step, device, opts.trace)
    except torch.OutOfMemoryError:
        return {**row, "error": "out of memory"}
    except BaselineUnavailable as e:
        return {**row, "error": str(e)}
    median = statistics.median(times)
    tokens_per_sec = micro * seq / median
    peak = opts.peak_tflops or detect_peak_tflops(device)
    tflops, mfu = achieved_tflops(tokens_per_sec, flops_per_token(cfg, seq), peak)
    row.update(step_ms=1000 * median, tokens_per_sec=tokens_per_sec, tflops=tflops, mfu=mfu,
               peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
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
    print(prof.key_averages().table(sort_by=sort, row_limit=45, max_name_column_width=70))


def add_ratios(rows: list[dict]) -> None:
    """``vs_baseline`` on each of our rows: its tokens/s ÷ the best baseline's at the same preset and micro-batch."""
    for r in rows:
        if r["kind"] != "ours" or "error" in r:
            continue
        best = max((b["tokens_per_sec"] for b in rows if b["kind"] != "ours" and "error" not in b
                    and (b["preset"], b["micro_batch"]) == (r["preset"], r["micro_batch"])), default=None)
        if best:
            r["vs_baseline"] = r["tokens_per_sec"] / best


def format_table(rows: list[dict]) -> str:
    lines = [f"{'config':<40}{'preset':>7}{'mb':>4}{'step ms':>10}{'tok/s':>11}{'TFLOP/s':>9}{'MFU':>7}"
             f"{'mem GiB':>9}{'vs best base':>14}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:<40}{r['preset']:>7}{r['micro_batch']:>4}  {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        ratio = f"{r['vs_baseline']:.2f}x" if r.get("vs_baseline") else "-"
        lines.append(f"{r['name']:<40}{r['preset']:>7}{r['micro_batch']:>4}{r['step_ms']:>10.1f}"
                     f"{r['tokens_per_sec']:>11,.0f}{r['tflops']:>9.1f}{mfu:>7}{mem:>9}{ratio:>14}")
    return "\n".join(lines)


def child_argv(opts: argparse.Namespace, kind: str, preset: str, micro: int, json_path: str) -> list[str]:
    """The command line of the subprocess that times ``kind`` alone, with this run's shapes and options."""
    argv = [sys.executable, "-m", "megatron_mobilellm.benchmark", "--run", kind, "--presets", preset,
            "--micro-batch-sizes", str(micro), "--seq-length", str(opts.seq_length), "--steps", str(opts.steps),
            "--warmup", str(opts.warmup), "--json", json_path]
    argv += ["--peak-tflops", str(opts.peak_tflops)] if opts.peak_tflops else []
    if kind == "ours":
        argv += ["--deepspeed_config", opts.deepspeed_config, "--attention-backend", opts.attention_backend,
                 "--optimizer", opts.optimizer, "--loss-chunk-size", str(opts.loss_chunk_size), "--seed",
                 str(opts.seed)]
        argv += ["--compile", opts.compile] if opts.compile else []
        argv += ["--cuda-graphs"] if opts.cuda_graphs else []
        argv += ["--recompute-activations"] if opts.recompute_activations else []
        argv += ["--stock-zero-reductions"] if opts.stock_zero_reductions else []
        argv += ["--profile"] if opts.profile else []
        argv += ["--trace", opts.trace] if opts.trace else []
        argv += ["--sync-debug"] if opts.sync_debug else []
    return argv


def run_child(opts: argparse.Namespace, kind: str, preset: str, micro: int, seq: int) -> tuple[dict, dict, str]:
    """One configuration in a fresh process: its row, the run's metadata and its stdout."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "row.json")
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}  # the child is its own world of one
        res = subprocess.run(child_argv(opts, kind, preset, micro, path), capture_output=True, text=True, env=env)
        if res.returncode == 0 and os.path.exists(path):
            data = json.loads(Path(path).read_text())
            return data["rows"][0], data, res.stdout
    last = (res.stderr.strip().splitlines() or ["no output"])[-1]
    row = {"name": run_label(kind, opts, 1), "kind": kind, "preset": preset, "micro_batch": micro,
           "seq_length": seq, "error": f"failed (exit {res.returncode}): {last[:200]}"}
    return row, {}, res.stdout + res.stderr


def compare(opts: argparse.Namespace) -> tuple[list[dict], dict]:
    """Every configuration of every shape in its own subprocess, one after another."""
    jobs = [(preset, micro, kind) for preset in opts.presets for micro in opts.micro_batch_sizes
            for kind in ("ours", *opts.baseline)]
    rows, meta = [], {"world_size": 1}
    bar = tqdm(jobs, desc="benchmark", unit="process", file=sys.stderr)
    for preset, micro, kind in bar:
        seq = sequence_length(preset, opts)
        bar.set_postfix_str(f"{preset} mb{micro} {kind}")
        row, data, stdout = run_child(opts, kind, preset, micro, seq)
        meta.update((k, v) for k, v in data.items() if k not in ("rows", "command"))
        if ((opts.profile or opts.sync_debug) and kind == "ours") or "failed" in row.get("error", ""):
            tqdm.write(stdout)
        tqdm.write(f"{row['name']} {preset} mb{micro}: "
                   + (row["error"] if "error" in row else f"{row['tokens_per_sec']:,.0f} tok/s"))
        rows.append(row)
    return rows, meta


def in_process(opts: argparse.Namespace) -> tuple[list[dict], dict]:
    """``--run KIND`` or a multi-rank launch: time in this process (ours on every rank under a launcher)."""
    device = init_distributed()
    kind = opts.run or "ours"
    rows = []
    for preset in opts.presets:
        for micro in opts.micro_batch_sizes:
            rows.append(measure(kind, preset, micro, sequence_length(preset, opts), device, opts))
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "world_size": dist.get_world_size()}
    return rows, meta


def main(argv: list[str] | None = None) -> list[dict]:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["125M"], choices=list(PRESETS))
    p.add_argument("--micro-batch-sizes", nargs="+", type=int, default=[16])
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--deepspeed_config", default="ds_configs/zero2.json")
    p.add_argument("--optimizer", default=OptimizerConfig.optimizer, choices=OPTIMIZERS)
    p.add_argument("--seed", type=int, default=EngineConfig.seed, help="ours: weight initialisation")
    g = p.add_argument_group("ours: the trainer's engine flags")
    add_engine_arguments(g)
    g.add_argument("--stock-zero-reductions", action="store_true",
                   help="(ablation) DeepSpeed's own per-tensor overflow check and gradient norm, not the fused ones")
    p.add_argument("--baseline", nargs="*", default=list(BASELINES), choices=BASELINES,
                   help="transformers baselines, each timed in its own process after ours (none: the flag alone)")
    p.add_argument("--run", choices=("ours", *BASELINES), default=None,
                   help="time only this configuration, in this process (what each subprocess of a comparison does)")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--profile", action="store_true", help="print the top GPU kernels of 3 of our steps")
    p.add_argument("--sync-debug", action="store_true",
                   help="list the host-device synchronisations of our timed steps, with their Python stacks (CUDA)")
    p.add_argument("--trace", default=None, help="with --profile: also write a Chrome trace here (.json or .json.gz)")
    opts = p.parse_args(argv)

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        build_ds_config(opts.deepspeed_config, 1, 1, 1, 1.0, False)  # a bad config fails here, not in each child
        rows, meta = in_process(opts) if opts.run or launched else compare(opts)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    if opts.run or launched:
        if dist.get_rank() != 0:
            return rows
    else:
        add_ratios(rows)
    print(format_table(rows), flush=True)
    if opts.json:
        with atomic_file(opts.json) as f:
            json.dump({**meta, "command": sys.argv[1:] if argv is None else argv, "rows": rows}, f, indent=2)
    crashed = [r["name"] for r in rows if r.get("error", "").startswith("failed")]
    if crashed:  # a script running the benchmark must notice; out of memory or not installed are results
        print(f"error: {len(crashed)} configuration(s) failed in their process: {', '.join(crashed)}",
              file=sys.stderr, flush=True)
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main()
    exit_without_teardown()
