"""Ctrl-C stops a training command with one line saying what there is to continue from, and exit code 130; it used to
print a KeyboardInterrupt traceback from wherever the signal landed (a DiT forward, the optimizer, tqdm)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from editgrpo.config import GRPOConfig
from editgrpo.train import interrupted as grpo_interrupted
from viva_base.data.build.cli import cli as build_cli
from viva_base.recipe import run_cli
from viva_base.sft import SFTConfig
from viva_base.training import resume_hint


def _stop(cfg):
    raise KeyboardInterrupt


def _checkpoint(out, step, complete=True):
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if complete:
        (folder / "trainer_state.json").write_text("{}")


def test_the_line_names_the_newest_complete_checkpoint_and_how_to_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    out = tmp_path / "run"
    args = [f"output_dir={out}", "model.tiny=true"]
    assert run_cli(_stop, SFTConfig, args, interrupted=resume_hint) == 130
    assert capsys.readouterr().err == (f"error: interrupted; no checkpoint was written yet in {out} (the next run "
                                       "starts fresh)\n")
    _checkpoint(out, 2)
    _checkpoint(out, 4)
    _checkpoint(out, 6, complete=False)  # cut short while being written: never a resume point
    assert run_cli(_stop, SFTConfig, args, interrupted=resume_hint) == 130
    assert capsys.readouterr().err == (f"error: interrupted; the last checkpoint is {out / 'checkpoint-4'}: run the "
                                       "same command with resume=latest to continue from it\n")
    assert run_cli(_stop, SFTConfig, [*args, "resume=latest"], interrupted=resume_hint) == 130
    assert capsys.readouterr().err.endswith("checkpoint-4: run the same command again to continue from it\n")
    # under torchrun / accelerate every process gets the signal: one line, from the first
    monkeypatch.setenv("RANK", "1")
    assert run_cli(_stop, SFTConfig, args, interrupted=resume_hint) == 130
    assert capsys.readouterr().err == ""


def test_a_second_signal_while_the_line_is_written_is_ignored(tmp_path, monkeypatch, capsys):
    """Under torchrun a worker gets the terminal's SIGINT and then the one torchrun forwards: the second used to land
    while the first was being reported and end the worker with a KeyboardInterrupt traceback instead of the line."""
    monkeypatch.delenv("RANK", raising=False)

    def hint_while_signalled(cfg):
        os.kill(os.getpid(), signal.SIGINT)  # the second signal arrives while the hint is being made
        time.sleep(0.05)  # Python runs a handler between bytecodes: give it the chance
        return "a hint"

    before = signal.getsignal(signal.SIGINT)
    assert run_cli(_stop, SFTConfig, [f"output_dir={tmp_path}", "model.tiny=true"],
                   interrupted=hint_while_signalled) == 130
    assert capsys.readouterr().err == "error: interrupted; a hint\n"
    assert signal.getsignal(signal.SIGINT) is before  # the handler is back once the line is out


def test_the_toy_chain_and_the_data_build_say_a_rerun_continues(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    out = tmp_path / "toy"
    assert run_cli(_stop, GRPOConfig, ["recipe=recipes/toy.yaml", f"output_dir={out}"],
                   interrupted=grpo_interrupted) == 130
    assert capsys.readouterr().err == (f"error: interrupted; every finished stage is kept in {out}: run the same "
                                       "command again to continue\n")
    assert run_cli(_stop, GRPOConfig, ["recipe=recipes/tiny.yaml", f"output_dir={out}"],
                   interrupted=grpo_interrupted) == 130
    assert "no checkpoint was written yet" in capsys.readouterr().err
    monkeypatch.setattr("viva_base.data.build.cli.main", _stop)
    assert build_cli([f"output_dir={tmp_path / 'pairs'}", "inputs=x"]) == 130
    assert capsys.readouterr().err == (f"error: interrupted; every finished record is kept in {tmp_path / 'pairs'}: "
                                       "run the same command again to build the rest\n")


@pytest.mark.slow
def test_ctrl_c_during_edit_grpo_is_one_line_and_the_checkpoint_resumes(tmp_path, repo_root):
    """The real signal, sent to ``python -m editgrpo.train recipe=recipes/tiny.yaml`` once checkpoint-2 is written:
    exit 130, no traceback, the line names the newest complete checkpoint, and the run resumes from it to the end."""
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "editgrpo.train", "recipe=recipes/tiny.yaml", f"output_dir={run}", "report_to=none"]
    proc = subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (run / "checkpoint-2" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    newest = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*") if (p / "trainer_state.json").exists())
    assert last == (f"error: interrupted; the last checkpoint is {run / f'checkpoint-{newest[-1]}'}: run the same "
                    "command with resume=latest to continue from it"), last
    resumed = subprocess.run([*cmd, "resume=latest"], cwd=repo_root, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / "lora").is_dir() and f"resumed from {run / f'checkpoint-{newest[-1]}'}" in resumed.stderr
