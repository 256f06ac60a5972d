"""Throughput, model FLOPs utilisation and the metrics writer (stdout + TensorBoard, rank 0 only).

FLOPs per token (training, forward + backward) = 6·N_matmul + 12·L·d·s, where N_matmul counts every weight that
multiplies activations (all linear layers of every pass — LS passes count twice — plus the output projection,
which the tied embedding still costs), L is the number of block passes, d the hidden size and s the sequence
length; the second term is the attention score/value matmuls (causal masking is not discounted, as in PaLM's
and Megatron's accounting). MFU = achieved FLOP/s ÷ the device's dense bf16 peak.
"""

from __future__ import annotations

import math
import resource
import sys
import time

import torch
import torch.distributed as dist

from megatron_mobilellm.config import ModelConfig

# Dense bf16 peak TFLOP/s by GPU name fragment (datasheet numbers, SXM parts).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "A10G": 125.0, "V100": 125.0, "B200": 2250.0}


def matmul_params(cfg: ModelConfig) -> int:
    return cfg.num_passes * cfg.layer_matmul_parameters + cfg.vocab_size * cfg.hidden_size


def flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_passes * cfg.hidden_size * seq_length


def achieved_tflops(tokens_per_sec_per_gpu: float, flops_per_token: float,
                    peak_tflops: float | None) -> tuple[float, float | None]:
    """TFLOP/s per GPU of a token rate, and the MFU it means (None without a known peak)."""
    tflops = tokens_per_sec_per_gpu * flops_per_token / 1e12
    return tflops, (tflops / peak_tflops if peak_tflops else None)


def detect_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def max_memory_gib(device: torch.device) -> float:
    """Peak allocated device memory; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * (1 if sys.platform != "darwin" else 1 / 1024) / 2**20


class Throughput:
    """Tokens/s, TFLOP/s per GPU and MFU over the iterations since the last ``measure``."""

    def __init__(self, tokens_per_iter: int, flops_per_token: float, peak_tflops: float | None,
                 device: torch.device):
        self.tokens_per_iter, self.flops_per_token = tokens_per_iter, flops_per_token
        self.peak = peak_tflops or detect_peak_tflops(device)
        self.device = device
        self.start, self.iters = time.perf_counter(), 0

    def measure(self) -> dict[str, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - self.start
        world = dist.get_world_size()
        tokens_per_sec = self.tokens_per_iter * self.iters / elapsed
        tflops, mfu = achieved_tflops(tokens_per_sec / world, self.flops_per_token, self.peak)
        out = {"ms_per_iter": 1000 * elapsed / max(self.iters, 1), "tokens_per_sec": tokens_per_sec,
               "tokens_per_sec_per_gpu": tokens_per_sec / world, "tflops_per_gpu": tflops, "mfu": mfu or 0.0}
        self.start, self.iters = time.perf_counter(), 0
        return out


class MetricsWriter:
    """Prints a Megatron-style line and mirrors scalars to TensorBoard; a no-op on ranks other than 0."""

    def __init__(self, rank: int, tensorboard_dir: str | None):
        self.enabled = rank == 0
        self.tb = None
        if self.enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=tensorboard_dir)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.tb is not None:
            for tag, v in values.items():
                self.tb.add_scalar(tag, v, step)

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 80.0))
