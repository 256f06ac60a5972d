"""The benchmark runs on CPU (tiny preset): ours and every transformers baseline, each in its own process."""

import gzip
import json
import subprocess
import sys

from helpers import ROOT, env

TINY = ["--presets", "tiny", "--micro-batch-sizes", "2", "--seq-length", "64", "--steps", "2", "--warmup", "1",
        "--deepspeed_config", "ds_configs/zero1.json"]


def bench(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_mobilellm.benchmark", *TINY, *args], capture_output=True,
                          text=True, env=env(), cwd=ROOT, timeout=900)


def test_comparison_runs_each_configuration_in_a_fresh_process(tmp_path):
    out = tmp_path / "bench.json"
    res = bench(["--json", str(out)])  # default: ours, then eager, compile and liger baselines
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["ours zero1", "transformers eager", "transformers compile",
                                         "transformers liger"]
    timed = [r for r in rows if "error" not in r]
    assert len(timed) == 3 and all(r["tokens_per_sec"] > 0 and r["step_ms"] > 0 for r in timed)
    assert len({r["pid"] for r in timed}) == 3  # one process per configuration
    # liger_kernel is optional and its Triton kernels need a GPU: a row that says why, not a crash
    assert rows[3]["error"] in ("not installed", "needs CUDA (Triton kernels)")
    best = max(r["tokens_per_sec"] for r in rows[1:3])
    assert abs(rows[0]["vs_baseline"] - rows[0]["tokens_per_sec"] / best) < 1e-9
    table = res.stdout[res.stdout.index("config"):]
    for name in ("ours zero1", "transformers eager", "transformers compile", "transformers liger"):
        assert name in table


def test_single_configuration_in_process_with_profile(tmp_path):
    out = tmp_path / "bench.json"
    res = bench(["--run", "ours", "--stock-zero-reductions", "--json", str(out), "--profile", "--trace",
                 str(tmp_path / "trace.json.gz"), "--sync-debug"])
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["world_size"] == 1 and [r["name"] for r in data["rows"]] == ["ours zero1 stock-reductions"]
    assert "Self CPU" in res.stdout  # the profiler's kernel table
    assert "host syncs: not measured on cpu (CUDA only)" in res.stdout  # --sync-debug: a CUDA sync-debug mode
    with gzip.open(tmp_path / "trace.json.gz") as f:
        assert json.load(f)["traceEvents"]  # --trace: a Chrome trace of our profiled steps


def test_a_failing_configuration_is_a_row_and_a_bad_config_an_error_line(tmp_path):
    res = bench(["--baseline", "--cuda-graphs"])  # ours alone; its process refuses CUDA graphs without a GPU
    assert "failed (exit 1): error: --cuda-graphs needs a CUDA device" in res.stdout  # the table still prints
    assert res.returncode == 1 and "error: 1 configuration(s) failed" in res.stderr  # and scripts notice
    res = bench(["--deepspeed_config", str(tmp_path / "missing.json")])
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith("error: --deepspeed_config")


def test_markov_corpus_uses_its_states_and_fixed_successors():
    """tools/synthetic_data.py --kind markov (the loss-comparison corpus): only ``states`` token ids occur, and
    every token is followed by one of its own fixed successors; the same seed gives the same corpus."""
    import importlib.util

    import numpy as np

    spec = importlib.util.spec_from_file_location("synthetic_data", ROOT / "tools" / "synthetic_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tokens = module.markov_tokens(np.random.default_rng(0), vocab=1000, n=20000, states=50, successors=4)
    assert tokens.min() >= 0 and tokens.max() < 1000 and len(np.unique(tokens)) == 50
    pairs = {}
    for a, b in zip(tokens[:-1].tolist(), tokens[1:].tolist()):
        pairs.setdefault(a, []).append(b)
    assert all(len(set(followers)) <= 4 for followers in pairs.values())
    again = module.markov_tokens(np.random.default_rng(0), vocab=1000, n=20000, states=50, successors=4)
    assert np.array_equal(tokens, again)


def test_sync_report_counts_each_sync_per_step_with_its_stack():
    """--sync-debug's bookkeeping (on CPU the sync-debug mode itself is unavailable, so the warning that mode
    raises at each host sync is raised by hand): counted per call site and step, other warnings passed on."""
    import warnings

    from megatron_mobilellm.benchmark import SYNC_WARNING, collect_sync_warnings, format_sync_report

    def optimizer_step():
        warnings.warn(f"{SYNC_WARNING} (Triggered internally at CUDAFunctions.cpp:162.)")

    with warnings.catch_warnings(record=True) as passed_on:
        with collect_sync_warnings() as seen:
            for _ in range(3):
                optimizer_step()
                warnings.warn("an unrelated warning")
    assert [str(w.message) for w in passed_on] == ["an unrelated warning"] * 3
    report = format_sync_report(seen, 3).splitlines()
    assert report[0] == "host syncs in 3 timed steps: 3 (1.0 per step)"
    assert report[1].startswith(f"  1.0 per step: {SYNC_WARNING}")
    assert report[-1].endswith(" optimizer_step") and "test_benchmark.py" in report[-1]
