#!/usr/bin/env python
"""ZeRO stages side by side from benchmark JSON files (``python -m megatron_mobilellm.benchmark --json``).

    python tools/zero_stage_table.py runs/zero3_benchmark/*.json

Each row of ours is set against the row of the reference stage (``--reference``, default ``zero2``) with the same
preset, micro-batch, number of GPUs and compile mode: tokens/s per GPU as a fraction of the reference's, and peak
memory. The stage is the DeepSpeed config's file name, so any config (e.g. a tuned copy) gets a row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_mobilellm.errors import ArgumentParser

COMPILE_SCOPES = ("blocks", "decoder")  # the benchmark's --compile choices, which lead its row names


def load_rows(paths: list[str]) -> list[dict]:
    """Our rows, each with its stage (the config's name) and the rest of its label (compile mode) split out."""
    rows = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        for row in data["rows"]:
            if "error" in row or not row["name"].startswith("ours"):
                continue
            words = [w for w in row["name"].split()[1:] if not w.startswith("×")]  # ours [scope[+graphs]] CONFIG ...
            at = 1 if words[0].split("+")[0] in COMPILE_SCOPES else 0
            stage, mode = words[at], " ".join(words[:at] + words[at + 1:]) or "eager"
            rows.append({**row, "stage": stage, "mode": mode, "world_size": data.get("world_size", 1)})
    return rows


def table(rows: list[dict], reference: str) -> list[str]:
    def key(r: dict) -> tuple:
        return r["preset"], r["micro_batch"], r["world_size"], r["mode"]

    refs = {key(r): r for r in rows if r["stage"] == reference}
    lines = [f"| preset | micro-batch | GPUs | compile | config | tok/s per GPU | vs {reference} | peak mem GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (*key(r), r["stage"])):
        ref = refs.get(key(r))
        ratio = f"{100 * r['tokens_per_sec'] / ref['tokens_per_sec']:.0f} %" if ref else "—"
        mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "—"
        lines.append(f"| {r['preset']} | {r['micro_batch']} | {r['world_size']} | {r['mode']} | {r['stage']} | "
                     f"{r['tokens_per_sec']:,.0f} | {ratio} | {mem} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", help="benchmark JSON files")
    p.add_argument("--reference", default="zero2", help="the config name other stages are compared with")
    opts = p.parse_args(argv)
    print("\n".join(table(load_rows(opts.json), opts.reference)))


if __name__ == "__main__":
    main()
