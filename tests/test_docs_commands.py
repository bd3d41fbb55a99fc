"""Every command shown in README.md and docs/ runs as written, so the docs cannot rot.

The code blocks (fenced, or indented by four spaces) are scanned for the project's commands (`python -m ...`,
`accelerate launch ... -m ...`, `torchrun ... -m ...`), plus `hf`, `pip install` and `bash` lines. Each project
command's arguments go through the command's own parser (the recipe loader for recipe commands: every key, type
and recipe file is checked; argparse for the others), and its `--help` must work. Placeholders the reader fills
in (`<...>`, `...`, `[--optional ARGS]`) are left out of the check. Commands that need GPUs, real checkpoints or a
long time are only parsed, never run.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# python -m MODULE -> (module, entry function, recipe schema "module:Class" or None for argparse commands)
ENTRY_POINTS = {
    "viva_base.sft": ("viva_base.sft", "cli", "viva_base.sft:SFTConfig"),
    "editgrpo.train": ("editgrpo.train", "cli", "editgrpo.config:GRPOConfig"),
    "viva_base.data.build": ("viva_base.data.build.cli", "cli", "viva_base.data.build.cli:BuildConfig"),
    "viva_base.edit": ("viva_base.edit", "main", None),
    "viva_base.app": ("viva_base.app", "main", None),
    "viva_base.data.toyworld.build": ("viva_base.data.toyworld.build", "main", None),
    "viva_base.recipe_docs": ("viva_base.recipe_docs", "main", None),
    "editgrpo.diagnose": ("editgrpo.diagnose", "main", None),
    "editgrpo.toy_reward": ("editgrpo.toy_reward", "main", None),
    "editgrpo.toy_preference": ("editgrpo.toy_preference", "main", None),
    "editgrpo.recipes": ("editgrpo.recipes", "main", None),
    "benchmarks.viebench": ("benchmarks.viebench", "main", None),
    "benchmarks.report": ("benchmarks.report", "main", None),
    "benchmarks.toybench": ("benchmarks.toybench", "main", None),
    "benchmarks.ablation": ("benchmarks.ablation", "main", None),
    "benchmarks.algorithms": ("benchmarks.algorithms", "main", None),
    "benchmarks.perf": ("benchmarks.perf", "main", None),
    "benchmarks.scaling": ("benchmarks.scaling", "main", None),
    "benchmarks.gpu_check": ("benchmarks.gpu_check", "main", None),
    "rewards.serve": ("rewards.serve", "cli", "rewards.serve:ServeConfig"),
}
EXTERNAL_MODULES = {"pytest"}  # `python -m pytest ...`: not ours


def _code_lines(text: str) -> list[str]:
    """Lines inside fenced blocks and four-space indented blocks (after a blank line), continuations joined."""
    out, fenced, indented, prev_blank = [], False, False, True
    for line in text.splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            out.append(line.strip())
        elif line.startswith("    ") and (indented or prev_blank):
            indented = True
            out.append(line.strip())
        elif line.strip():
            indented = False
        prev_blank = not line.strip()
    joined, buf = [], ""
    for line in out:
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        joined.append(buf + line)
        buf = ""
    return joined


def _words(command: str) -> list[str] | None:
    command = re.sub(r"\[--[^\]]*\]", " ", command)  # [--optional ARGS]
    command = re.sub(r"<[^>]*>", "...", command)     # <your recipe>
    try:
        return shlex.split(command, comments=True)
    except ValueError:
        return None


def collect() -> list[tuple[str, list[str]]]:
    """``(where, words)`` of every shell command in the docs."""
    found = []
    for path in DOCS:
        for line in _code_lines(path.read_text()):
            all_words = _words(line) or []
            parts, cur = [], []
            for w in all_words + ["&&"]:  # a && b; c
                if w in ("&&", ";", "||"):
                    parts.append(cur)
                    cur = []
                else:
                    cur.append(w)
            for words in parts:
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # ENV=1 prefixes
                    words = words[1:]
                if words and words[0] in ("python", "accelerate", "torchrun", "hf", "pip", "bash"):
                    found.append((f"{path.relative_to(REPO)}: {line[:90]}", words))
    return found


COMMANDS = collect()


def _module_and_args(words: list[str]) -> tuple[str, list[str]] | None:
    if "-m" not in words:
        return None
    i = words.index("-m")
    return words[i + 1], words[i + 2:]


def _placeholder(arg: str) -> bool:
    return "<" in arg or "..." in arg or arg.endswith("=")


class _Parsed(Exception):
    pass


@contextlib.contextmanager
def _stop_after_parsing():
    """argparse validates the arguments (its errors exit 2), then the command stops before doing any work."""
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        real(self, args, namespace)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = real


def _project_commands():
    for where, words in COMMANDS:
        ma = _module_and_args(words)
        if ma and ma[0] not in EXTERNAL_MODULES:
            yield where, ma[0], ma[1]


def test_the_docs_show_project_commands_and_each_is_known():
    mods = {m for _, m, _ in _project_commands()}
    assert {"viva_base.sft", "editgrpo.train", "viva_base.edit", "benchmarks.viebench"} <= mods, mods
    unknown = sorted(mods - set(ENTRY_POINTS))
    assert not unknown, f"commands in the docs that this test does not know how to check: {unknown}"


@pytest.mark.parametrize("where,module,args", list(_project_commands()), ids=lambda v: v if isinstance(v, str) else "")
def test_documented_command_parses(where, module, args, monkeypatch):
    monkeypatch.chdir(REPO)
    mod_name, entry, schema = ENTRY_POINTS[module]
    args = [a for a in args if not _placeholder(a)]
    if schema is not None:
        from viva_base.recipe import load_recipe

        smod, cls = schema.split(":")
        if module == "viva_base.data.build":
            from viva_base.data.build.cli import normalize_argv

            args = normalize_argv(args)
        if module == "rewards.serve":  # reads only the recipe's rewards: block
            from rewards.serve import load_config

            load_config(args)
            return
        load_recipe(getattr(importlib.import_module(smod), cls), args)  # unknown key / bad type / missing recipe
        return
    func = getattr(importlib.import_module(mod_name), entry)
    with _stop_after_parsing():
        try:
            func(args)
        except _Parsed:
            return
        except SystemExit as exc:
            pytest.fail(f"{where}: the parser rejects the documented arguments (exit {exc.code})")
    pytest.fail(f"{where}: {module} never parsed its arguments")


@pytest.mark.parametrize("module", sorted({m for _, m, _ in _project_commands()}))
def test_documented_command_help(module, capsys):
    mod_name, entry, _ = ENTRY_POINTS[module]
    func = getattr(importlib.import_module(mod_name), entry)
    try:
        code = func(["--help"])
    except SystemExit as exc:
        code = exc.code
    assert code in (0, None)
    assert "usage" in capsys.readouterr().out.lower() or module in ("viva_base.sft", "editgrpo.train",
                                                                      "viva_base.data.build", "rewards.serve")


def test_other_documented_tools_exist():
    """`hf download`, `pip install -e ".[EXTRA]"` and `bash SCRIPT SUBCOMMAND` lines refer to things that exist."""
    import tomllib

    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    seen = set()
    for where, words in COMMANDS:
        if words[0] == "hf":
            seen.add("hf")
            assert words[1] == "download", where
            exe = shutil.which("hf")
            assert exe, "the README says `hf download`: huggingface_hub's `hf` command must be installed"
            r = subprocess.run([exe, "download", "--help"], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
        elif words[0] == "pip" and "-e" in words:
            seen.add("pip")
            spec = words[words.index("-e") + 1]
            m = re.fullmatch(r"\.\[([\w,-]+)\]", spec)
            assert spec == "." or (m and set(m.group(1).split(",")) <= extras), f"{where}: unknown extra in {spec}"
        elif words[0] == "bash" and words[1].endswith(".sh"):
            seen.add("bash")
            script = REPO / words[1]
            assert script.is_file(), where
            if len(words) > 2 and not words[2].startswith("-"):
                assert re.search(rf"\b{re.escape(words[2])}\)", script.read_text()), f"{where}: no {words[2]} case"
    assert {"hf", "pip", "bash"} <= seen


def test_documented_launcher_configs_exist():
    for where, words in COMMANDS:
        if "--config_file" in words:
            path = words[words.index("--config_file") + 1]
            assert (REPO / path).is_file(), f"{where}: {path} does not exist"


def test_python_c_snippets_run():
    for where, words in COMMANDS:
        if words[:2] == ["python", "-c"]:
            r = subprocess.run([sys.executable, "-c", words[2]], capture_output=True, text=True, cwd=REPO, timeout=300)
            assert r.returncode == 0, f"{where}: {r.stderr[-1000:]}"
