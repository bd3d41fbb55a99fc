"""Held-out evaluation shares its batches out over the processes (editgrpo.evaluate.Evaluator.run) and gathers them
on the main process: on 2 processes (torchrun, gloo) the step's folder is byte for byte the 1-process one, and each
process edited only its share. Before, the main process evaluated everything while the others waited in a barrier:
at recipes/viva.yaml's size (50 ODE steps with CFG, 480 x 848 x 33) that is minutes per item, and NCCL's default
10-minute timeout would have stopped every multi-GPU run with ``eval.manifest`` set.

Run as a script under torchrun by the test (``python -m torch.distributed.run ... this_file OUT MANIFEST``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

SEEDS, BATCH = [1, 2], 2  # 5 items -> 3 batches a seed, 6 in all: rank 0 runs batches 0, 2, 4, rank 1 runs 1, 3, 5


def evaluate(out: Path, manifest: str, accelerator=None) -> dict:
    """The evaluation of a tiny editor (fixed weights) over ``manifest``, writing ``out/eval/step-3``; returns what
    this process did: its rank and how many items its instructor encoded."""
    from omegaconf import OmegaConf

    from editgrpo.config import EvalConfig
    from editgrpo.evaluate import Evaluator
    from rewards.registry import CombinedReward
    from viva_base.tiny import make_tiny_editor

    cfg = OmegaConf.structured(EvalConfig)
    cfg.manifest, cfg.seeds, cfg.num_steps, cfg.batch_size, cfg.save_videos = manifest, SEEDS, 2, BATCH, 3
    reward = CombinedReward.from_config({"clip_sp": {"weight": 1.0, "model": "tiny:hf"}})
    reward.load("cpu")
    editor = make_tiny_editor(seed=0)
    summary = Evaluator(cfg, reward, out / "eval").run(editor, step=3, accelerator=accelerator)
    rank = accelerator.process_index if accelerator is not None else 0
    return {"rank": rank, "encoded": editor.calls["instructor"], "summary": summary is not None}


def _folder(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_two_processes_share_the_evaluation_and_write_what_one_process_writes(tmp_path, repo_root):
    from test_scale_multiprocess import _launch, _torchrun

    from viva_base.data.toy import ensure_toy_dataset

    manifest = str(ensure_toy_dataset(tmp_path / "toy", seed=3, n_sft_video=0, n_sft_image=0, n_grpo=0,
                                      n_eval_compound=3, n_eval_simple=2)["eval"])
    one = evaluate(tmp_path / "one", manifest)
    assert one["encoded"] == 5 * len(SEEDS)  # the instructor's count of prompts encoded: 5 items a seed
    _launch(_torchrun(2), [str(tmp_path / "two"), manifest], repo_root, script=__file__)
    ranks = [json.loads((tmp_path / "two" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    # rank 0: batches 0, 2, 4 (items 0-1 and 4 of seed 1, items 2-3 of seed 2); rank 1: the others
    assert [r["encoded"] for r in ranks] == [5, 5] and [r["summary"] for r in ranks] == [True, False]
    a, b = _folder(tmp_path / "one" / "eval" / "step-3"), _folder(tmp_path / "two" / "eval" / "step-3")
    assert sorted(a) == sorted(b) and any(name.startswith("videos/") for name in a)
    assert a == b  # items.jsonl, summary.json and the showcase clips, byte for byte


def _items(step_dir: Path) -> dict[str, dict]:
    return {row["id"]: row for row in map(json.loads, (step_dir / "items.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_zero3_training_evaluates_on_two_processes_as_one_process_does(tmp_path, repo_root):
    """Edit-GRPO under DeepSpeed ZeRO-3 (every DiT parameter partitioned, 2 processes) with held-out evaluation before
    and after its iteration: 5 items in batches of 2 are 3 batches, so rank 0 runs two and rank 1 one; every DiT
    forward gathers the parameters from both, so rank 1 runs a repeat of its batch (dropped) to keep in step
    (Evaluator.share). Before, the trainer refused eval.manifest under ZeRO-3. Scores equal one process's to
    ZeRO-3's rounding (its linear layers run through DeepSpeed's own autograd function: test_scale_multiprocess)."""
    from test_scale_multiprocess import COMMON, _deepspeed, _launch, _zero_config, one_process_reference

    import test_scale_multiprocess
    from viva_base.data.toy import ensure_toy_dataset

    manifest = str(ensure_toy_dataset(tmp_path / "toy", seed=3, n_sft_video=0, n_sft_image=0, n_grpo=0,
                                      n_eval_compound=3, n_eval_simple=2)["eval"])
    evaluation = [f"eval.manifest={manifest}", "eval.seeds=[1]", "eval.batch_size=2", "eval.num_steps=2",
                  "eval.save_videos=2", "eval.at_start=true"]
    one_process_reference([*COMMON, *evaluation], tmp_path / "one")
    config = _zero_config(tmp_path, repo_root, "zero3", stage3_param_persistence_threshold=0)
    run = tmp_path / "zero3"
    _launch(_deepspeed(config, 2), [str(tmp_path / "dump"), *COMMON, *evaluation, f"output_dir={run}"], repo_root,
            script=test_scale_multiprocess.__file__)
    assert torch.load(tmp_path / "dump" / "dump-1.pt", weights_only=True)["partitioned"] > 10
    for step in ("step-0", "step-1"):
        ref, got = _items(tmp_path / "one" / "eval" / step), _items(run / "eval" / step)
        assert list(got) == list(ref) and len(ref) == 5
        for item, row in ref.items():
            assert set(got[item]["scores"]) == set(row["scores"])
            for key, values in row["scores"].items():
                assert got[item]["scores"][key] == pytest.approx(values, rel=1e-4, abs=1e-5), (step, item, key)
        assert sorted(p.name for p in (run / "eval" / step / "videos").iterdir()) == \
            sorted(p.name for p in (tmp_path / "one" / "eval" / step / "videos").iterdir())


if __name__ == "__main__":  # one process of the torchrun launch
    import os

    os.environ.setdefault("ACCELERATE_USE_CPU", "1")
    from accelerate import Accelerator

    out, manifest = Path(sys.argv[1]), sys.argv[2]
    accelerator = Accelerator(cpu=True)
    done = evaluate(out, manifest, accelerator)
    (out / f"rank-{done['rank']}.json").write_text(json.dumps(done))
