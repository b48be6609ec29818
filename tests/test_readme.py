"""The README cannot rot: every shell command and Python block in it runs here, in README order."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```(sh|python)\n(.*?)```", README, flags=re.S)


def _commands(block: str) -> list[str]:
    """Logical lines of a shell block (continuations joined, comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [line.split(" #")[0].strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("readme")
    (work / "examples").symlink_to(REPO / "examples")
    return work


def test_make_targets_named_in_the_readme_exist():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.M))
    named = set(re.findall(r"(?:^|`)make ([\w-]+)", README, flags=re.M))
    assert named and named <= targets, named - targets


def test_every_readme_command_and_python_block_runs(workdir):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ran = 0
    for lang, block in BLOCKS:
        if lang == "python":
            res = subprocess.run([sys.executable, "-c", block], cwd=workdir, capture_output=True, text=True, env=env)
            assert res.returncode == 0, f"README python block failed:\n{block}\n{res.stderr[-2000:]}"
            ran += 1
            continue
        for cmd in _commands(block):
            if cmd.startswith(("make ", ". .venv")):
                continue  # the set-up commands are what CI itself runs; targets are checked above
            argv = shlex.split(cmd)
            assert argv[0] == "hetmoe-compile", f"README shell command not covered by this test: {cmd}"
            res = subprocess.run(
                [sys.executable, "-m", "hetmoe_compile", *argv[1:]],
                cwd=workdir,
                capture_output=True,
                text=True,
                env=env,
            )
            assert res.returncode == 0, f"README command failed: {cmd}\n{res.stderr[-2000:]}"
            ran += 1
    assert ran >= 9  # six CLI commands and three Python blocks at the time of writing
