"""The toy chain under ``torchrun --nproc_per_node 2`` (gloo, CPU). Before, it never got past its SFT stage: the main
process ran the SFT inside the launch's process group while the other process waited in a barrier, so the SFT's first
collective was never matched (and a wait longer than gloo's 30-minute timeout would have stopped the launch anyway).
Now the other processes wait for the stages by polling a file (``main_process_first_polled``) and the main process
trains the SFT stage as a process of its own, as a 1-process chain does.

Also run as a script under torchrun by the tests (``python -m torch.distributed.run ... this_file OUT [fail]``): the
polled wait, with the process group's timeout at 2 s and the main process's work taking 5 s (or failing after it)."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

TIMEOUT, WORK = 2.0, 5.0
SHRUNK = ["recipe=recipes/toy.yaml", "report_to=none", "toy.n_sft_video=8", "toy.n_sft_image=4", "toy.n_grpo=4",
          "toy.n_eval_compound=2", "toy.n_eval_simple=1", "toy.reward_steps=10", "toy.instructor_steps=5",
          "toy.instructor_compound=8",
          "toy.sft_overrides=[train.max_steps=3,train.checkpoint_every=0,train.compile=none]",
          "train.num_iterations=1", "train.prompts_per_iteration=2", "train.num_generations=2", "sampling.num_steps=4",
          "sampling.sde_window_size=2", "sampling.sde_window_range=[0,1]", "eval.num_steps=2", "eval.seeds=[1]",
          "eval.save_videos=2"]


@pytest.mark.slow
def test_other_processes_wait_for_long_main_process_work_without_a_collective(tmp_path, repo_root):
    from test_scale_multiprocess import _launch, _torchrun

    _launch(_torchrun(2), [str(tmp_path)], repo_root, script=__file__)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    # the main process's block ran first, for longer than the process group's timeout; rank 1's after it
    assert ranks[0]["block_end"] - ranks[0]["block_start"] >= WORK > TIMEOUT
    assert ranks[1]["block_start"] >= ranks[0]["block_end"]
    assert not list(tmp_path.glob(".main-process-done-*"))  # the marker is removed once every process has read it


@pytest.mark.slow
def test_when_the_main_process_fails_the_others_stop_with_a_user_error_and_no_marker_is_left(tmp_path, repo_root):
    from test_scale_multiprocess import _launch, _torchrun

    _launch(_torchrun(2), [str(tmp_path), "fail"], repo_root, script=__file__)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["error"] == "ValueError: the stage broke"
    assert ranks[1]["error"].startswith("UserError: the main process stopped (failed: ValueError)")
    # rank 1 ran no block of its own, and stopped as soon as the main process failed (the poll is 0.2 s), not after a
    # process group's timeout
    assert ranks[1]["block_start"] is None and abs(ranks[1]["stopped"] - ranks[0]["stopped"]) < TIMEOUT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank-0.json", "rank-1.json"]  # marker and receipts gone


@pytest.mark.slow
def test_the_toy_chain_runs_on_two_processes_and_shares_its_sft_stage_with_one_process(tmp_path, repo_root,
                                                                                       monkeypatch):
    import subprocess

    from test_scale_multiprocess import _require_success, _torchrun

    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(repo_root)}
    proc = subprocess.run([*_torchrun(2), "-m", "editgrpo.train", *SHRUNK, f"output_dir={tmp_path}"], cwd=repo_root,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    _require_success(proc)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["n_prompts"] == 3 and (tmp_path / "lora" / "adapter_config.json").exists()
    assert (tmp_path / "sft" / "final" / "editor_config.json").exists()
    assert not list(tmp_path.glob(".main-process-done-*"))
    # one process on the same folder reuses every stage: nothing is trained again
    from editgrpo import toy
    from editgrpo.config import GRPOConfig
    from viva_base.recipe import load_recipe

    def no_training(*args, **kwargs):
        raise AssertionError("the SFT stage was trained again")

    monkeypatch.chdir(repo_root)
    monkeypatch.setattr("viva_base.sft.main", no_training)
    monkeypatch.setattr(toy, "_sft_in_own_process", no_training)
    cfg = toy.prepare(load_recipe(GRPOConfig, [*SHRUNK, f"output_dir={tmp_path}"]))
    grpo = load_recipe(GRPOConfig, [f"recipe={tmp_path / 'config.yaml'}"])
    assert cfg.toy.sft_fingerprint == grpo.toy.sft_fingerprint and cfg.model.pretrained == grpo.model.pretrained


if __name__ == "__main__":  # one process of the torchrun launch
    import datetime

    from accelerate import Accelerator, PartialState

    from viva_base.training import main_process_first_polled

    out, fail = Path(sys.argv[1]), sys.argv[2:] == ["fail"]
    PartialState(cpu=True, backend="gloo", timeout=datetime.timedelta(seconds=TIMEOUT))
    accelerator = Accelerator(cpu=True)
    start = end = error = None
    try:
        with main_process_first_polled(accelerator, out, poll=0.2):
            start = time.time()
            if accelerator.is_main_process:
                time.sleep(WORK)  # a stage: longer than the process group's timeout
                if fail:
                    raise ValueError("the stage broke")
            end = time.time()
    except Exception as exc:  # recorded for the test; no collective after a failure
        error = f"{type(exc).__name__}: {exc}"
    else:
        accelerator.wait_for_everyone()
    record = {"block_start": start, "block_end": end, "error": error, "stopped": time.time()}
    (out / f"rank-{accelerator.process_index}.json").write_text(json.dumps(record))
