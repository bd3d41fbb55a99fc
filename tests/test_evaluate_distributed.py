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


if __name__ == "__main__":  # one process of the torchrun launch
    import os

    os.environ.setdefault("ACCELERATE_USE_CPU", "1")
    from accelerate import Accelerator

    out, manifest = Path(sys.argv[1]), sys.argv[2]
    accelerator = Accelerator(cpu=True)
    done = evaluate(out, manifest, accelerator)
    (out / f"rank-{done['rank']}.json").write_text(json.dumps(done))
