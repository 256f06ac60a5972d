"""The launch examples build valid trainer command lines (checked by the trainer's own parser)."""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import ROOT, fake_slurm, free_port, trainer_env
from megatron_mobilellm.training.arguments import parse_args


def dry_run(size: str, **env_vars) -> list[str]:
    res = subprocess.run(["bash", str(ROOT / "examples" / "pretrain_mobilellm.sh"), size],
                         env={**os.environ, "DRY_RUN": "1", **env_vars}, capture_output=True, text=True, cwd=ROOT,
                         check=True)
    return shlex.split(res.stdout)


def trainer_args(cmd: list[str]) -> list[str]:
    return cmd[cmd.index("megatron_mobilellm.pretrain") + 1:]


@pytest.mark.parametrize("size", ["125M", "350M", "600M", "1B", "1.5B"])
def test_single_node_recipe(size):
    cmd = dry_run(size)
    assert cmd[:3] == ["deepspeed", "--num_gpus", "8"]
    args = parse_args(trainer_args(cmd))
    assert (args.micro_batch_size, args.global_batch_size, args.lr, args.min_lr) == (32, 256, 5e-4, 5e-5)
    assert (args.seq_length, args.lr_warmup_iters, args.clip_grad, args.weight_decay) == (2048, 1000, 1.0, 0.1)
    assert args.bf16 and args.save == args.load
    assert args.compile == "decoder" and args.cuda_graphs  # on by default: one micro-batch per step


def test_recipe_cuda_graphs_off_switch_and_skips_eager_and_zero3():
    assert not parse_args(trainer_args(dry_run("125M", CUDA_GRAPHS="0"))).cuda_graphs
    assert not parse_args(trainer_args(dry_run("125M", COMPILE=""))).cuda_graphs
    zero3_config = str(ROOT / "ds_configs" / "zero3.json")
    zero3 = parse_args(trainer_args(dry_run("1B", CUDA_GRAPHS="1", DS_CONFIG=zero3_config)))
    assert zero3.compile is None and not zero3.cuda_graphs  # ZeRO-3 measured faster eager
    zero3 = parse_args(trainer_args(dry_run("1B", COMPILE="blocks", DS_CONFIG=zero3_config)))
    assert zero3.compile == "blocks" and not zero3.cuda_graphs


def test_multi_node_recipe_scales_lr_linearly():
    cmd = dry_run("125M", HOSTFILE=str(ROOT / "examples" / "hostfile"), MASTER_ADDR="node-1")
    assert cmd[1:5] == ["--hostfile", str(ROOT / "examples" / "hostfile"), "--master_addr", "node-1"]
    args = parse_args(trainer_args(cmd))
    assert args.global_batch_size == 4 * 8 * 32 and args.lr == pytest.approx(2e-3)


@pytest.mark.parametrize("how", ["in_place", "spooled_submit_dir", "spooled_absolute_path"])
def test_slurm_script_launches_from_a_spooled_copy(tmp_path, how):
    """sbatch runs a copy of the script from its spool folder: the recipe must still be found (through
    SLURM_SUBMIT_DIR, or the absolute path the job was submitted with) and run from the repository root."""
    script = ROOT / "examples" / "slurm_pretrain.sbatch"
    work = tmp_path / "work"  # the job's working directory, outside the repository
    work.mkdir()
    if how != "in_place":
        script = tmp_path / "spool" / "job42" / "slurm_script"
        script.parent.mkdir(parents=True)
        shutil.copy(ROOT / "examples" / "slurm_pretrain.sbatch", script)
    submitted = str(ROOT / "examples" / "slurm_pretrain.sbatch") if how == "spooled_absolute_path" else ""
    fake_slurm(tmp_path / "bin", submitted)
    submit_dir = ROOT if how == "spooled_submit_dir" else work
    record = tmp_path / "launch.txt"
    subprocess.run(["bash", str(script), "350M", "--train-iters", "7"], cwd=work, check=True,
                   env={**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "LAUNCH_RECORD": str(record),
                        "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "gpu-[a-c]", "SLURM_JOB_NUM_NODES": "3",
                        "SLURM_SUBMIT_DIR": str(submit_dir)})
    cwd, *cmd = record.read_text().splitlines()
    assert Path(cwd) == ROOT  # relative --deepspeed_config / --data-path defaults resolve in the repository
    hostfile = work / "hostfile.42"
    assert hostfile.read_text() == "gpu-a slots=8\ngpu-b slots=8\ngpu-c slots=8\n"
    assert cmd[:4] == ["--hostfile", str(hostfile), "--master_addr", "gpu-a"]
    args = parse_args(cmd[cmd.index("megatron_mobilellm.pretrain") + 1:])
    assert args.global_batch_size == 3 * 8 * 32 and args.lr == pytest.approx(1.5e-3) and args.train_iters == 7
    assert (ROOT / args.deepspeed_config).is_file()


def test_slurm_script_without_a_repository_says_so(tmp_path):
    script = tmp_path / "slurm_script"
    shutil.copy(ROOT / "examples" / "slurm_pretrain.sbatch", script)
    fake_slurm(tmp_path / "bin", "")
    res = subprocess.run(["bash", str(script), "125M"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
                              "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "gpu-a", "SLURM_JOB_NUM_NODES": "1",
                              "SLURM_SUBMIT_DIR": str(tmp_path)})
    assert res.returncode == 1 and res.stderr.startswith("error: cannot find the repository")
    assert len(res.stderr.splitlines()) == 1 and not list(tmp_path.glob("hostfile*"))


def test_node_benchmark_script_scales_and_resumes_on_cpu(tmp_path):
    """The one-call node measurement (examples/node_benchmark.sh) in miniature: 2 CPU ranks stand in for a node."""
    small = {"GPUS": "2", "FEWER": "1", "OUT": str(tmp_path), "STAGES": "scaling resume", "PRESETS": "tiny",
             "MICRO_BATCH": "2", "SEQ": "64", "ZEROS": "2", "STEPS": "2", "WARMUP": "1", "FAST": "",
             "RESUME_PRESET": "tiny", "RESUME_ITERS": "10", "VOCAB": "512", "MASTER_PORT": str(free_port())}
    # Eager throughout (FAST empty) and no baselines (the bare --baseline): trainer_env's Dynamo switch applies.
    res = subprocess.run(["bash", str(ROOT / "examples" / "node_benchmark.sh")], env={**trainer_env([]), **small},
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [line for line in (tmp_path / "table.md").read_text().splitlines() if line.startswith("| ours zero2")]
    assert len(rows) == 1 and rows[0].split("|")[4].strip() == "2" and rows[0].split("|")[7].strip().endswith("%")
    compare = (tmp_path / "resume" / "compare.txt").read_text()
    assert "5 common iterations" in compare and float(compare.split("max |Δ| ")[1].split()[0]) < 1e-3
