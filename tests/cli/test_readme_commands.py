"""The README's tour commands that need no model file, run as written (from the repository root):
the IR examples it names ship in examples/ and every such command succeeds."""
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def readme_example_commands() -> list[str]:
    """`ember ...` lines of the README's sh blocks that read a file of examples/."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        for line in block.splitlines():
            command = line.split("  #")[0].strip()
            if command.startswith("ember ") and "examples/" in command:
                commands.append(command)
    return commands


COMMANDS = readme_example_commands()


def test_the_readme_uses_the_shipped_examples():
    assert len(COMMANDS) >= 4
    for command in COMMANDS:
        for word in shlex.split(command):
            if word.startswith("examples/"):
                assert (ROOT / word).is_file(), f"README names {word}, which is not shipped"


@pytest.mark.parametrize("command", COMMANDS)
def test_a_readme_command_runs(command, tmp_path):
    if "--svg" in command and shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is missing (apt-get install graphviz)")
    words = [str(tmp_path / Path(w).name) if w.startswith("/tmp/") or w.endswith(".svg") else w
             for w in shlex.split(command)]
    out = subprocess.run([sys.executable, "-m", "ember.cli", *words[1:]], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{command}: {out.stderr}"
    assert out.stdout.startswith("graph ")
