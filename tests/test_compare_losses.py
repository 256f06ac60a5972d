"""tools/compare_losses.py pairs curves by name from JSON files and, with --exact, fails unless bit-identical."""

import json
import subprocess
import sys

from helpers import ROOT, env


def compare(tmp_path, a, b, *flags):
    for name, runs in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(runs))
    return subprocess.run([sys.executable, str(ROOT / "tools" / "compare_losses.py"), str(tmp_path / "a.json"),
                           str(tmp_path / "b.json"), *flags], capture_output=True, text=True, env=env(), cwd=ROOT)


def test_identical_runs_pass_exact(tmp_path):
    runs = {"zero1": {"train": {"1": 6.240840912, "2": 6.1}}, "zero3": {"train": {"1": 6.2, "2": 6.0}}}
    res = compare(tmp_path, runs, runs, "--exact")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("bit-identical") == 2 and "zero1/train: max |Δ| 0.0 at" in res.stdout


def test_one_ulp_apart_fails_exact_but_not_plain(tmp_path):
    a = {"1": 6.240840912, "2": 6.1}
    b = {"1": 6.240840912, "2": 6.1 + 2**-50}
    res = compare(tmp_path, a, b, "--exact")
    assert res.returncode == 1 and "NOT identical" in res.stdout and "at iteration 2" in res.stdout
    assert compare(tmp_path, a, b).returncode == 0
    res = compare(tmp_path, a, {"1": 6.240840912}, "--exact")
    assert res.returncode == 1 and "steps only in a: [2]" in res.stdout
