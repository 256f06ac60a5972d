"""Weak-scaling table from benchmark JSON files (``python -m megatron_mobilellm.benchmark --json``).

    python tools/scaling_table.py runs/node_benchmark/*.json

Rows of the same configuration (preset, micro-batch, compile/ZeRO options) measured with 1 process and with N
processes are paired; efficiency = N-GPU tokens/s per GPU ÷ 1-GPU tokens/s. Rows without a 1-GPU partner are
listed with their own numbers only.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from megatron_mobilellm.errors import ArgumentParser


def load_rows(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        for row in data["rows"]:
            if "error" not in row and row["name"].startswith("ours"):
                rows.append({**row, "world_size": data.get("world_size", 1),
                             "config": re.sub(r" ×\d+$", "", row["name"])})
    return rows


def table(rows: list[dict]) -> list[str]:
    single = {(r["config"], r["preset"], r["micro_batch"]): r for r in rows if r["world_size"] == 1}
    lines = ["| config | preset | micro-batch | GPUs | tok/s per GPU | 1-GPU tok/s | efficiency | MFU | mem GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["preset"], r["config"], r["micro_batch"], r["world_size"])):
        if r["world_size"] == 1:
            continue
        one = single.get((r["config"], r["preset"], r["micro_batch"]))
        base = f"{one['tokens_per_sec']:,.0f}" if one else "—"
        eff = f"{100 * r['tokens_per_sec'] / one['tokens_per_sec']:.1f} %" if one else "—"
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "—"
        mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "—"
        lines.append(f"| {r['config']} | {r['preset']} | {r['micro_batch']} | {r['world_size']} | "
                     f"{r['tokens_per_sec']:,.0f} | {base} | {eff} | {mfu} | {mem} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", help="benchmark JSON files, 1-process and N-process runs")
    opts = p.parse_args(argv)
    print("\n".join(table(load_rows(opts.json))))


if __name__ == "__main__":
    main()
