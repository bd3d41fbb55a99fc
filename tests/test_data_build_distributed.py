"""The data build on 2 processes (torchrun, gloo): the processes never wait for each other, and the last shard to
finish writes the complete manifest. Before, every process waited in a barrier for the slowest shard and the main
process then wrote the manifest; shards of real data finish hours apart, and NCCL's process group times out after
10 minutes, so every multi-GPU build whose shards ended more than 10 minutes apart was stopped at its end.

Run as a script under torchrun by the test (``python -m torch.distributed.run ... this_file OUT INPUTS``): every
collective of ``torch.distributed`` raises there, and rank 1 takes ``SLOW`` extra seconds a record."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

SLOW = 3.0
CAPTIONS = ["Two dogs sleep on a sofa.", "A cat sits on a chair.", "Two dogs run on the grass.",
            "A cat sleeps on a bed.", "A dog jumps over a fence."]
ARGS = ["stages=[add_remove]", "generator.num_inference_steps=1", "clip.frames=5", "clip.size=[16,24]",
        "video_ext=.mkv", "generator.model.tiny=true", "detector.model=tiny", "tracker.model=tiny"]


@pytest.mark.slow
def test_two_processes_never_wait_for_each_other_and_the_last_one_writes_the_manifest(tmp_path, repo_root):
    from test_scale_multiprocess import _launch, _torchrun

    from viva_base.data.build.records import in_shard
    from viva_base.data.manifest import read_manifest
    from viva_base.video import write_video

    inputs = tmp_path / "in"
    inputs.mkdir()
    g = torch.Generator().manual_seed(0)
    for i, caption in enumerate(CAPTIONS):
        write_video(inputs / f"c{i}.mp4", torch.rand(6, 3, 20, 20, generator=g))
        (inputs / f"c{i}.txt").write_text(caption)
    shards = [[i for i in range(len(CAPTIONS)) if in_shard(f"c{i}", r, 2)] for r in (0, 1)]
    assert all(shards)  # both processes have records to build
    out = tmp_path / "out"
    _launch(_torchrun(2), [str(out), str(inputs)], repo_root, script=__file__)
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["built"] for r in ranks] == [len(s) for s in shards]
    # rank 0 (the main process) was done and had exited its build before the slow rank 1 finished its records
    assert ranks[0]["end"] < ranks[1]["end"] - SLOW / 2
    assert ranks[0]["pairs"] == len(shards[0])  # what had finished when it rebuilt the manifest: its own shard
    assert ranks[1]["pairs"] == len(CAPTIONS)   # the last to finish saw every record
    rows = read_manifest(out / "pairs.jsonl")
    assert len(rows) == len(CAPTIONS) and all(any(f"/c{i}/" in r["source"] for r in rows) for i in range(len(CAPTIONS)))
    assert json.loads((out / "summary.json").read_text())["records_done"] == len(CAPTIONS)


if __name__ == "__main__":  # one process of the torchrun launch
    import os

    os.environ.setdefault("ACCELERATE_USE_CPU", "1")
    import torch.distributed as dist

    def collective(*args, **kwargs):
        raise AssertionError("the data build used a torch.distributed collective: its processes must never wait")

    for name in ("barrier", "all_reduce", "broadcast", "all_gather", "all_gather_object", "broadcast_object_list",
                 "gather", "gather_object", "reduce", "monitored_barrier"):
        setattr(dist, name, collective)

    from viva_base.data.build import cli
    from viva_base.recipe import load_recipe

    out, inputs = Path(sys.argv[1]), sys.argv[2]
    rank = int(os.environ["RANK"])
    build = cli.build_record

    def build_record(*args, **kwargs):
        record = build(*args, **kwargs)
        time.sleep(SLOW if rank == 1 else 0.0)
        return record

    cli.build_record = build_record
    run = cli.main(load_recipe(cli.BuildConfig, [f"inputs={inputs}", f"output_dir={out}", *ARGS]))
    (out / f"rank-{rank}.json").write_text(json.dumps({**run, "end": time.time()}))
