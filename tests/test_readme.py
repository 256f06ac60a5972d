"""The README's commands work as written: every command in a ```bash block or an inline code span is parsed by the
real parser of the program it calls — our tools' and the trainer's argparse, DeepSpeed's launcher, pip,
tensorboard, lm-eval. The launch scripts are dry-run and the command they build is checked the same way; scripts
that take no arguments must be run by a test. Every ``--flag`` the prose mentions must exist in one of those
parsers, and every repository path a command names must exist."""

from __future__ import annotations

import argparse
import io
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import ROOT, fake_slurm, setup_keyword

README = ROOT / "README.md"
PROGRAMS = {"python", "python3", "bash", "sbatch", "deepspeed", "torchrun", "lm_eval", "tensorboard", "pip"}
# sbatch is not installed here and its options are SLURM's own; the script it submits is still dry-run.
SBATCH_OPTIONS = {"--nodes"}


class Parsed(BaseException):
    """Raised from inside a program's argument parser once it has parsed: the program itself never runs."""

    def __init__(self, namespace, extras: list[str]):
        self.namespace, self.extras = namespace, extras


@dataclass
class Checked:
    errors: list[str] = field(default_factory=list)
    parsers: list[argparse.ArgumentParser] = field(default_factory=list)


def readme_commands() -> list[str]:
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        commands += [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    for span in re.findall(r"`([^`\n]+)`", text):
        words = span.split()
        if len(words) > 1 and (words[0] in PROGRAMS or "=" in words[0] and words[1] in PROGRAMS):
            commands.append(span)
    return commands


def run_parser(entry, argv: list[str], checked: Checked) -> argparse.Namespace:
    """Run ``entry`` (a program's main) with ``sys.argv = argv`` until its argparse parser has parsed, then stop it
    there. The parser is recorded; a parse error raises AssertionError with argparse's message."""
    original = argparse.ArgumentParser.parse_known_args
    depth = [0]

    def parse_known_args(self, args=None, namespace=None):
        checked.parsers.append(self)
        depth[0] += 1
        try:
            namespace, extras = original(self, args, namespace)
        finally:
            depth[0] -= 1
        if depth[0] == 0:  # the outermost parser (subcommand parsers run inside it)
            raise Parsed(namespace, extras)
        return namespace, extras

    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_known_args", parse_known_args)
        mp.setattr(sys, "argv", argv)
        mp.chdir(ROOT)
        try:
            with redirect_stderr(stderr), redirect_stdout(io.StringIO()):
                entry()
        except Parsed as done:
            if done.extras:
                raise AssertionError(f"unrecognized arguments: {' '.join(done.extras)}") from None
            return done.namespace
        except SystemExit:
            raise AssertionError(stderr.getvalue().strip().splitlines()[-1]) from None
    raise AssertionError("the program ran without parsing its arguments")


def check_python(args: list[str], checked: Checked) -> None:
    if args[:2] == ["-m", "pytest"]:
        ci = (ROOT / ".ci" / "run").read_text().replace("python3 ", "python ")
        assert shlex.join(["python", *args]) in ci, "the README's test command is not the one CI runs"
        return
    if args[0] == "-m":
        module, rest = args[1], args[2:]
        run_parser(lambda: runpy.run_module(module, run_name="__main__", alter_sys=True), [module, *rest], checked)
    else:
        script, rest = args[0], args[1:]
        assert (ROOT / script).is_file(), f"no such script {script}"
        run_parser(lambda: runpy.run_path(str(ROOT / script), run_name="__main__"), [script, *rest], checked)


def check_deepspeed(args: list[str], checked: Checked) -> None:
    from deepspeed.launcher.runner import parse_args

    ns = run_parser(lambda: parse_args(args), ["deepspeed", *args], checked)
    if ns.module:
        check_python(["-m", ns.user_script, *ns.user_args], checked)
    else:
        check_python([ns.user_script, *ns.user_args], checked)


def check_torchrun(args: list[str], checked: Checked) -> None:
    from torch.distributed.run import parse_args

    ns = run_parser(lambda: parse_args(args), ["torchrun", *args], checked)
    module = ["-m"] if ns.module else []
    check_python([*module, ns.training_script, *ns.training_script_args], checked)


def check_script(script: str, args: list[str], env: dict[str, str], checked: Checked, cwd: Path) -> None:
    """A launch script that supports DRY_RUN=1 prints the command it would run, which is checked in turn; one that
    does not must take no arguments and be run by a test (or be CI's entry point)."""
    path = ROOT / script
    assert path.is_file(), f"no such script {script}"
    if "DRY_RUN" not in path.read_text():
        assert not args, f"{script} takes no arguments"
        if script.startswith(".ci/"):  # CI's entry point: it runs the tests
            return
        tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
        assert f'"{path.name}"' in tests or f"/{path.name}" in tests, f"no test runs {script}"
        return
    res = subprocess.run(["bash", str(path), *args], env={**os.environ, **env, "DRY_RUN": "1"}, cwd=cwd,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr.strip()
    check_command(shlex.split(res.stdout), {}, checked, cwd)


def check_sbatch(args: list[str], checked: Checked, tmp_path: Path) -> None:
    options = args[:next(i for i, a in enumerate(args) if not a.startswith("-"))]
    assert {o.split("=")[0] for o in options} <= SBATCH_OPTIONS, f"unexpected sbatch options {options}"
    nodes = next((o.split("=")[1] for o in options if o.startswith("--nodes=")), "1")
    script, rest = args[len(options)], args[len(options) + 1:]
    assert (ROOT / script).is_file(), f"no such script {script}"
    spooled = tmp_path / "slurm_script"  # sbatch runs a copy of the script from its spool folder
    shutil.copy(ROOT / script, spooled)
    fake_slurm(tmp_path / "bin")  # scontrol, as SLURM provides it on the first node
    slurm = {"PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "1",
             "SLURM_JOB_NODELIST": "gpu-[a-c]", "SLURM_JOB_NUM_NODES": nodes, "SLURM_SUBMIT_DIR": str(ROOT)}
    check_script(str(spooled), rest, slurm, checked, tmp_path)  # the job's working directory: the hostfile goes there


def check_pip(args: list[str]) -> None:
    from pip._internal.commands import create_command

    options, requirements = create_command(args[0]).parse_args(args[1:])
    for editable in options.editables:
        extras = re.fullmatch(r"\.(?:\[(.*)\])?", editable)[1] or ""
        unknown = {e for e in extras.split(",") if e} - set(setup_keyword("extras_require"))
        assert not unknown, f"setup.py has no extra {sorted(unknown)}"
    for req in requirements:  # a pinned torch must be the one CI installs
        assert req in (ROOT / ".ci" / "run").read_text(), f"{req} is not what .ci/run installs"


def check_tensorboard(args: list[str], checked: Checked) -> None:
    from tensorboard import program

    run_parser(lambda: program.TensorBoard().configure(argv=["tensorboard", *args]), ["tensorboard", *args],
               checked)


def check_lm_eval(args: list[str], checked: Checked) -> None:
    from lm_eval._cli import HarnessCLI

    run_parser(lambda: HarnessCLI().parse_args(), ["lm_eval", *args], checked)


def check_command(words: list[str], env: dict[str, str], checked: Checked, tmp_path: Path) -> None:
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # leading VAR=value assignments
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    program, args = words[0], words[1:]
    for arg in args:  # files of this repository that a command names exist
        if re.match(r"(ds_configs|examples|tools|docs)/", arg):
            assert (ROOT / arg).exists(), f"no such file {arg}"
    if program in ("python", "python3"):
        check_python(args, checked)
    elif program == "bash":
        check_script(args[0], args[1:], env, checked, ROOT)
    elif program == "sbatch":
        check_sbatch(args, checked, tmp_path)
    elif program == "deepspeed":
        check_deepspeed(args, checked)
    elif program == "torchrun":
        check_torchrun(args, checked)
    elif program == "pip":
        check_pip(args)
    elif program == "tensorboard":
        check_tensorboard(args, checked)
    elif program == "lm_eval":
        check_lm_eval(args, checked)
    else:
        raise AssertionError(f"no parser known for {program}")


@pytest.fixture(scope="module")
def checked(tmp_path_factory) -> Checked:
    result = Checked()
    for i, cmd in enumerate(readme_commands()):
        words = shlex.split(cmd, comments=True)
        # A skeleton such as `deepspeed [--hostfile FILE] --node_rank R ...` shows flags with placeholders: its
        # flag names must be accepted by the parsers it reaches.
        skeleton = "..." in words
        if skeleton:
            words = [w.strip("[]") for w in words if w != "..."]
        this = Checked()
        try:
            check_command(words, {}, this, tmp_path_factory.mktemp(f"cmd{i}"))
        except (AssertionError, SystemExit) as e:  # SystemExit: pip's optparse on a bad option
            if not skeleton:
                result.errors.append(f"`{cmd}`: {e}")
        if skeleton:
            known = {opt for p in this.parsers for opt in p._option_string_actions}
            unknown = [w for w in words if w.startswith("--") and w.split("=")[0] not in known]
            if not this.parsers or unknown:
                result.errors.append(f"`{cmd}`: flags no parser accepts: {unknown}")
        result.parsers += this.parsers
    return result


def test_readme_commands_parse_with_the_real_parsers(checked):
    commands = readme_commands()
    assert len(commands) > 15 and any(c.startswith("sbatch") for c in commands)
    assert not checked.errors, "\n".join(checked.errors)


def test_every_flag_the_readme_mentions_exists(checked):
    known = {opt for p in checked.parsers for opt in p._option_string_actions} | SBATCH_OPTIONS
    text = README.read_text()
    unknown = sorted({f for f in re.findall(r"(?<![\w-])--[a-zA-Z][\w-]*", text) if f not in known})
    assert not unknown, f"flags the README mentions that no parser accepts: {unknown}"
    # `--flag a|b|c` lists choices: each must be one the parser offers.
    actions = {opt: a for p in checked.parsers for opt, a in p._option_string_actions.items()}
    for flag, values in re.findall(r"`(--[\w-]+) ([\w.]+(?:\|[\w.]+)*)`", text):
        choices = actions[flag].choices
        if choices is not None:
            assert set(values.split("|")) <= set(choices), (flag, values, choices)


def test_readme_table_has_true_column_order():
    text = README.read_text()
    assert "| model | ARC-e | ARC-c | BoolQ | PIQA | SIQA | HellaSwag | OBQA | WinoGrande | avg |" in text
