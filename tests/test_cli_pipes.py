"""A command whose output is piped into a reader that stops early (``| head``, quitting ``less``) ends quietly with exit
code 141, as a Unix tool stopped by SIGPIPE does, not with a BrokenPipeError traceback (``viva_base.errors.exit_with``).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _run_into_a_closed_pipe(args, cwd):
    """Run ``python args`` with standard output a pipe whose reader has already gone."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, *args], stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=cwd,
                              timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    finally:
        os.close(write_end)


@pytest.mark.parametrize("args", [["-m", "editgrpo.recipes"],              # the list of shipped recipes
                                  ["-m", "editgrpo.train", "--help"],      # a recipe command's key reference
                                  ["-m", "viva_base.sft", "--help"]])
def test_a_reader_that_left_early_ends_the_command_quietly(repo_root, args):
    proc = _run_into_a_closed_pipe(args, repo_root)
    assert proc.returncode == 141, proc.stderr[-2000:]
    assert proc.stderr == ""


_RAISES = """
import sys
from viva_base.errors import exit_with

def main():
    print("some output")
    raise BrokenPipeError(32, "a reward server's socket")

exit_with(main)
"""


def test_a_broken_pipe_that_is_not_standard_output_still_fails_loudly(repo_root):
    """Only a reader of standard output that left is quiet: a broken socket is a failure to report."""
    proc = subprocess.run([sys.executable, "-c", _RAISES], capture_output=True, text=True, cwd=repo_root, timeout=60)
    assert proc.returncode == 1 and proc.stdout == "some output\n"
    assert "Traceback" in proc.stderr and "a reward server's socket" in proc.stderr


def test_the_console_scripts_end_as_the_modules_do(repo_root):
    """Each ``[project.scripts]`` entry is the function pip's wrapper calls; it must end through ``exit_with`` too
    (``viva-edit`` called ``main`` directly: a closed pipe was a traceback there)."""
    import tomllib

    scripts = tomllib.loads((Path(repo_root) / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts
    for name, target in scripts.items():
        module, function = target.split(":")
        # the command's main replaced by one that prints more than a pipe holds (argparse's own --help swallows
        # a write error, so it cannot tell)
        code = (f"import {module} as m; m.main = lambda *a: print('x' * 200000) or 0; m.{function}()")
        proc = _run_into_a_closed_pipe(["-c", code], repo_root)
        assert proc.returncode == 141 and proc.stderr == "", (name, proc.stderr[-2000:])
