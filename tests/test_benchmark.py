"""The benchmark runs on CPU (tiny preset) and writes its JSON; ours and the transformers baseline side by side."""

import gzip
import json
import subprocess
import sys

from helpers import ROOT, env


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, "-m", "megatron_mobilellm.benchmark", "--presets", "tiny",
                          "--micro-batch-sizes", "2", "--seq-length", "64", "--steps", "2", "--warmup", "1",
                          "--deepspeed_config", "ds_configs/zero1.json", "--compile", "decoder", "--baseline", "eager",
                          "--json", str(out), "--profile", "--trace", str(tmp_path / "trace.json.gz")], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"].split()[0] for r in rows] == ["ours", "transformers"]
    assert all(r["tokens_per_sec"] > 0 and r["step_ms"] > 0 for r in rows)
    assert rows[0]["vs_baseline"] > 0
    assert "config" in res.stdout and "tok/s" in res.stdout
    with gzip.open(tmp_path / "trace.json.gz") as f:
        assert json.load(f)["traceEvents"]  # --trace: a Chrome trace of our profiled steps
