"""Every command the README shows is run by a test or by the quickstart (or is an external tool, named here)."""

import re

from helpers import ROOT

# External tools the README mentions but that are not ours to test (or need a cluster / the internet).
EXTERNAL = {"tensorboard", "sbatch", "lm_eval"}


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if line:
                commands.append(line)
    commands += re.findall(r"`(lm_eval [^`]+)`", text)
    return commands


def exercised_text() -> str:
    parts = [p.read_text() for p in (ROOT / "tests").glob("test_*.py")]
    parts += [(ROOT / "examples" / "quickstart.sh").read_text(), (ROOT / ".ci" / "run").read_text()]
    return "\n".join(parts)


def entry_point(cmd: str) -> str:
    """What a command runs: a tool script, an example, a module, or an external program."""
    for pattern in (r"(tools/\w+\.py)", r"(examples/[\w.]+)", r"-m (megatron_mobilellm[\w.]*|pytest)",
                    r"--module (megatron_mobilellm[\w.]*)"):
        m = re.search(pattern, cmd)
        if m:
            return m.group(1)
    return cmd.split()[0] if not cmd.startswith("HOSTFILE=") else cmd.split()[2]


def test_every_readme_command_is_exercised():
    commands = readme_commands()
    assert len(commands) > 10
    tested = exercised_text()
    missing = []
    for cmd in commands:
        entry = entry_point(cmd)
        if entry in EXTERNAL or cmd.startswith("pip install"):
            assert cmd.startswith("pip install") and ("torch==2.13.0" in tested or "-e" in cmd) or entry in EXTERNAL
            continue
        name = entry.split("/")[-1]
        if name not in tested:
            missing.append(cmd)
    assert not missing, f"README commands no test or the quickstart runs: {missing}"


def test_readme_table_has_true_column_order():
    text = (ROOT / "README.md").read_text()
    assert "| model | ARC-e | ARC-c | BoolQ | PIQA | SIQA | HellaSwag | OBQA | WinoGrande | avg |" in text
