"""Past one node, on paper: gradient/parameter bytes each ZeRO stage moves per GPU per step, against compute time.

    python -m megatron_mobilellm.comm_model --nodes 4 32 --tokens-per-sec 125M=350000 350M=170000

Data parallelism over ``nodes × gpus_per_node`` GPUs, bf16 gradients and parameters (2 bytes each), Ψ parameters:

- ZeRO-1 and ZeRO-2: gradients reduce-scattered, updated parameters all-gathered after the step — the bytes of one
  all-reduce, 2·(N−1)/N·2Ψ per GPU (ZeRO-2 only frees the gradient shards earlier; the traffic is the same);
- ZeRO-3: parameters all-gathered for forward and again for backward, gradients reduce-scattered: 3·(N−1)/N·2Ψ.

Each pass is timed hierarchically, as on rail-optimised nodes (one NIC per GPU): a reduce-scatter over the g
GPUs of a node on NVLink, then each GPU's 1/g slice across the M nodes on its own NIC (an all-gather mirrors it),
so a pass of S bytes takes (g−1)/g·S / nvlink + (M−1)/M·S/g / nic; the bytes sent add up to (N−1)/N·S, the same
as a flat ring over N = M·g GPUs. Compute time is
tokens per GPU per step ÷ single-GPU tokens/s (measured, ``--tokens-per-sec``; else from ``--mfu`` and the FLOP
count). Efficiency is given as a range: communication fully exposed (t_c / (t_c + t_comm)) and fully overlapped
with compute (t_c / max(t_c, t_comm)); DeepSpeed overlaps ZeRO-2's gradient reduction with backward and
ZeRO-3's prefetched gathers with compute, but not ZeRO-1/2's parameter all-gather after the step, so real runs sit
in between. Bandwidths are per GPU per direction and default to what NCCL reaches, not the datasheet's links
(NVLink 4: 450 GB/s a direction, ~360 achieved; 400 Gb/s InfiniBand: 50 GB/s, ~45 achieved).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from megatron_mobilellm.config import PRESETS, get_config
from megatron_mobilellm.training.metrics import flops_per_token
from megatron_mobilellm.errors import ArgumentParser

PASSES = {1: 2, 2: 2, 3: 3}
"""Full passes of 2Ψ bytes through a reduce-scatter or all-gather per step, by ZeRO stage."""


@dataclass(frozen=True)
class Network:
    nvlink_gbs: float = 360.0
    """Achieved NVLink bandwidth per GPU per direction, GB/s."""
    nic_gbs: float = 45.0
    """Achieved inter-node bandwidth per GPU per direction (one 400 Gb/s NIC per GPU), GB/s."""
    gpus_per_node: int = 8


@dataclass(frozen=True)
class Prediction:
    stage: int
    gpus: int
    bytes_per_gpu: float
    """Bytes each GPU sends per step (reduce-scatter/all-gather payload, ring algorithm)."""
    comm_s: float
    compute_s: float

    @property
    def exposed_efficiency(self) -> float:
        return self.compute_s / (self.compute_s + self.comm_s)

    @property
    def overlapped_efficiency(self) -> float:
        return self.compute_s / max(self.compute_s, self.comm_s)


def pass_seconds(nbytes: float, nodes: int, net: Network) -> float:
    """One reduce-scatter or all-gather of ``nbytes`` over ``nodes`` nodes: the NVLink leg, then the NIC leg."""
    g = net.gpus_per_node
    intra = (g - 1) / g * nbytes / (net.nvlink_gbs * 1e9)
    inter = (nodes - 1) / nodes * nbytes / g / (net.nic_gbs * 1e9)
    return intra + inter


def predict(params: int, stage: int, nodes: int, compute_s: float, net: Network) -> Prediction:
    """Bytes and seconds of one step's ZeRO collectives for ``params`` parameters on ``nodes`` nodes."""
    if stage not in PASSES:
        raise ValueError(f"ZeRO stage must be one of {sorted(PASSES)}, got {stage}")
    gpus = nodes * net.gpus_per_node
    payload = 2.0 * params  # bf16
    sent = PASSES[stage] * (gpus - 1) / gpus * payload
    return Prediction(stage, gpus, sent, PASSES[stage] * pass_seconds(payload, nodes, net), compute_s)


def compute_seconds(preset: str, micro_batch: int, seq: int, tokens_per_sec: float | None, mfu: float,
                    peak_tflops: float) -> float:
    """One micro-batch step on one GPU: measured tokens/s when given, else the FLOP count at ``mfu``."""
    tokens = micro_batch * seq
    if tokens_per_sec:
        return tokens / tokens_per_sec
    return tokens * flops_per_token(get_config(preset), seq) / (mfu * peak_tflops * 1e12)


def table(presets: list[str], micro_batches: dict[str, int], nodes: list[int], stages: list[int], seq: int,
          measured: dict[str, float], mfu: float, peak_tflops: float, net: Network) -> list[str]:
    head = "| preset | params | micro-batch | compute ms | ZeRO | " + " | ".join(
        f"{m}×{net.gpus_per_node}: GB sent/GPU, comm ms, efficiency" for m in nodes) + " |"
    lines = [head, "|" + "---|" * (5 + len(nodes))]
    for preset in presets:
        params = get_config(preset).num_parameters
        mb = micro_batches[preset]
        t_c = compute_seconds(preset, mb, seq, measured.get(preset), mfu, peak_tflops)
        for stage in stages:
            cells = []
            for m in nodes:
                p = predict(params, stage, m, t_c, net)
                cells.append(f"{p.bytes_per_gpu / 1e9:.2f}, {1e3 * p.comm_s:.1f}, "
                             f"{100 * p.exposed_efficiency:.0f}–{100 * p.overlapped_efficiency:.0f} %")
            lines.append(f"| {preset} | {params / 1e6:.0f}M | {mb} | {1e3 * t_c:.0f} | {stage} | "
                         + " | ".join(cells) + " |")
    return lines


def _key_values(items: list[str], cast) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in PRESETS:
            raise SystemExit(f"error: expected PRESET=VALUE with a known preset, got {item!r}")
        out[key] = cast(value)
    return out


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["125M", "350M", "600M", "1B", "1.5B"], choices=list(PRESETS))
    p.add_argument("--nodes", nargs="+", type=int, default=[4, 32])
    p.add_argument("--stages", nargs="+", type=int, default=[1, 2, 3], choices=sorted(PASSES))
    p.add_argument("--micro-batch", nargs="*", default=[], metavar="PRESET=N",
                   help="per-GPU micro-batch (default 32 up to 600M, 8 above)")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--tokens-per-sec", nargs="*", default=[], metavar="PRESET=TOK_S",
                   help="measured single-GPU training tokens/s (python -m megatron_mobilellm.benchmark)")
    p.add_argument("--mfu", type=float, default=0.40, help="for presets without a measurement")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H200)")
    p.add_argument("--nvlink-gbs", type=float, default=Network.nvlink_gbs)
    p.add_argument("--nic-gbs", type=float, default=Network.nic_gbs)
    p.add_argument("--gpus-per-node", type=int, default=Network.gpus_per_node)
    opts = p.parse_args(argv)
    micro = {name: 8 if name in ("1B", "1.5B") else 32 for name in PRESETS} | _key_values(opts.micro_batch, int)
    net = Network(opts.nvlink_gbs, opts.nic_gbs, opts.gpus_per_node)
    print("\n".join(table(opts.presets, micro, opts.nodes, opts.stages, opts.seq_length,
                          _key_values(opts.tokens_per_sec, float), opts.mfu, opts.peak_tflops, net)))


if __name__ == "__main__":
    main()
