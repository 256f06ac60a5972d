"""A real two-node ``deepspeed --hostfile`` launch on one machine: through pdsh/ssh against an sshd on loopback,
and with ``--no_ssh --node_rank``. The pdsh test needs pdsh, openssh-server and root for sshd (``.ci/run`` installs
them): without them it is skipped with the reason, and fails under ``CI=true``."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import env, free_port, logged_losses, require, require_tools, tiny_args

CORPUS_DOCS = 100

SSHD = "/usr/sbin/sshd"


def launcher_env(extra: dict | None = None) -> dict:
    e = env()
    e.update(extra or {})
    return e


@pytest.fixture(scope="module")
def loopback_sshd(tmp_path_factory):
    """An sshd on 127.0.0.1 with a throwaway host key and client key; nothing outside tmp is touched but /run/sshd."""
    require_tools("pdsh", SSHD, "ssh", "ssh-keygen")
    require(os.geteuid() == 0, "needs root to run sshd on loopback")
    d = tmp_path_factory.mktemp("ssh")
    os.chmod(d, 0o700)
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    os.makedirs("/run/sshd", exist_ok=True)
    port = free_port()
    proc = subprocess.Popen([SSHD, "-D", "-e", "-p", str(port), "-h", str(d / "host_key"),
                             "-o", "ListenAddress=127.0.0.1", "-o", f"AuthorizedKeysFile={d / 'authorized_keys'}",
                             "-o", "StrictModes=no", "-o", f"PidFile={d / 'sshd.pid'}", "-o", "UsePAM=no"],
                            stderr=subprocess.PIPE)
    # DeepSpeed's reachability check and pdsh both run plain `ssh HOST`; an `ssh` first on PATH that adds our
    # config file points them at this sshd without touching ~/.ssh.
    (d / "config").write_text(f"Host localhost 127.0.0.1\n  Port {port}\n  IdentityFile {d / 'client_key'}\n"
                              "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")
    (d / "bin").mkdir()
    (d / "bin" / "ssh").write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {d / "config"} "$@"\n')
    os.chmod(d / "bin" / "ssh", 0o755)
    path = f"{d / 'bin'}{os.pathsep}{os.environ['PATH']}"
    for _ in range(50):  # wait until it accepts logins
        ok = subprocess.run(["ssh", "-o", "BatchMode=yes", "127.0.0.1", "true"], capture_output=True,
                            env={**os.environ, "PATH": path}).returncode == 0
        if ok:
            break
        time.sleep(0.2)
    assert ok, "sshd on loopback did not accept the throwaway key"
    yield path
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)


def write_launch_dir(tmp_path):
    (tmp_path / "hostfile").write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    # DeepSpeed exports the variables in ./.deepspeed_env to every node.
    (tmp_path / ".deepspeed_env").write_text("DS_ACCELERATOR=cpu\nOMP_NUM_THREADS=1\n")


def deepspeed_cmd(tmp_path, port, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(tmp_path / "hostfile"),
            "--master_addr", "127.0.0.1", "--master_port", str(port), *extra]


def check_run(stdout: str, ckpt) -> None:
    assert "world size 2" in stdout
    assert sorted(logged_losses(stdout)) == [1, 2, 3, 4, 5, 6]
    assert (ckpt / "latest").read_text().strip() == "iter_0000006"
    assert sorted(p.name for p in (ckpt / "iter_0000006").glob("rng_state_rank*.pt")) == [
        "rng_state_rank0.pt", "rng_state_rank1.pt"]


def test_two_nodes_over_pdsh_ssh(loopback_sshd, corpus, tmp_path):
    write_launch_dir(tmp_path)
    args = tiny_args(corpus, tmp_path, iters=6, zero=2, **{"--save": tmp_path / "ckpt", "--eval-iters": 0})
    cmd = deepspeed_cmd(tmp_path, free_port(), ["--launcher", "pdsh", "--module", "megatron_mobilellm.pretrain",
                                                *args])
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=launcher_env({"PDSH_RCMD_TYPE": "ssh", "PATH": loopback_sshd}))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # pdsh prefixes each node's output with its host name; rank 0 prints the log lines.
    stdout = "\n".join(line.split(": ", 1)[1] for line in res.stdout.splitlines() if ": " in line)
    check_run(stdout, tmp_path / "ckpt")


def test_two_nodes_no_ssh_node_rank(corpus, tmp_path):
    write_launch_dir(tmp_path)
    port = free_port()
    args = tiny_args(corpus, tmp_path, iters=6, zero=2, **{"--save": tmp_path / "ckpt", "--eval-iters": 0})
    procs = [subprocess.Popen(deepspeed_cmd(tmp_path, port, ["--no_ssh", "--node_rank", str(r), "--module",
                                                              "megatron_mobilellm.pretrain", *args]),
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=launcher_env({"DS_ACCELERATOR": "cpu"}))
             for r in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-3000:] + err[-3000:]
    check_run(outs[0][0], tmp_path / "ckpt")
