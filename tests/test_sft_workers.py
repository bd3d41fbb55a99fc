"""``data.num_workers``: DataLoader worker processes read and decode the next micro-batches' clips while one trains
(viva_base.data.pairs.pair_batches). Measured: one 480 x 848 x 33 pair (source, target, mask mp4s) took 2.5 s to read
and resize on a 2-core CPU (with another job running). recipes/sft_viva.yaml's plan (docs/scaling.md) has a 32 s step
of 16 micro-batches per GPU, 40% of them video pairs (4.5 s of GPU time each): read in the training loop, the video
pairs alone would add about 16 s to every step."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from viva_base.data.pairs import MicroBatches, MixedBatchSampler, PairDataset, pair_batches
from viva_base.errors import UserError
from viva_base.recipe import load_recipe
from viva_base.sft import SFTConfig, main

STEPS = ["recipe=recipes/sft_tiny.yaml", "report_to=none", "train.max_steps=4", "train.checkpoint_every=2",
         "data.toy.n_video=4", "data.toy.n_image=4", "train.gradient_accumulation_steps=2"]


def _run(out, *extra):
    return main(load_recipe(SFTConfig, [*STEPS, f"output_dir={out}", *extra]))


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_workers_train_on_the_same_batches_as_the_loop_and_resume(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    _run(tmp_path / "loop")
    _run(tmp_path / "workers", "data.num_workers=2")
    assert _losses(tmp_path / "workers") == _losses(tmp_path / "loop")
    weights = "final/transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(tmp_path / "loop" / weights)), load_file(str(tmp_path / "workers" / weights))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # stopped after step 2, resumed with workers from there (data.num_workers may change on resume): the same run
    _run(tmp_path / "resumed", "train.max_steps=2")
    _run(tmp_path / "resumed", "data.num_workers=2", "resume=latest")
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "loop")
    c = load_file(str(tmp_path / "resumed" / weights))
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_the_micro_batches_are_the_samplers_in_order_from_the_start_step():
    sampler = MixedBatchSampler([False] * 5 + [True] * 5, batch_size=4, p_video=0.5, seed=3)
    mb = MicroBatches(sampler, start=2, max_steps=5, accumulation=2, rank=1, per_micro=2)
    assert len(mb) == 6
    assert [mb[k] for k in range(6)] == [sampler.indices(s, m)[2:4] for s in (2, 3, 4) for m in (0, 1)]
    with pytest.raises(IndexError):
        mb[6]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_clip_that_cannot_be_read_stops_with_one_line(tmp_path, workers):
    from viva_base.video import write_video

    good = tmp_path / "good.mp4"
    write_video(good, torch.rand(5, 3, 32, 32), fps=8)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    records = [{"id": "ok", "source": str(good), "target": str(good), "instruction": "x"},
               {"id": "broken", "source": str(good), "target": str(bad), "instruction": "x"}]
    dataset = PairDataset(records)
    sampler = MixedBatchSampler(dataset.is_image, batch_size=1, p_video=1.0, seed=0)
    batches = MicroBatches(sampler, 0, 20, 1, 0, 1)
    assert {tuple(batches[k]) for k in range(20)} == {(0,), (1,)}  # both pairs come up
    with pytest.raises(UserError) as err:
        for _ in pair_batches(dataset, batches, workers):
            pass
    assert "bad.mp4" in str(err.value) and "\n" not in str(err.value) and "Traceback" not in str(err.value)


def test_num_workers_is_checked_before_any_work(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    with pytest.raises(UserError, match=r"data.num_workers=-1 must be >= 0"):
        _run(tmp_path / "x", "data.num_workers=-1")
    assert not (tmp_path / "x").exists()
