"""Edit-GRPO with its rewards served by ``python -m rewards.serve``: the same run as in-process scoring, overlapped
scoring of rollout chunks, and a server killed mid-run (NaN-dropped samples, then a clear stop with a checkpoint)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from editgrpo.scoring import ChunkScorer, ready_samples

SMALL = ["recipe=recipes/tiny.yaml", "report_to=none", "train.prompts_per_iteration=2", "train.num_generations=2",
         "data.toy_prompts=2", "sampling.num_steps=3", "sampling.sde_window_size=1", "train.checkpoint_every=0"]


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def _train(args):
    from editgrpo import train as T
    from editgrpo.config import GRPOConfig
    from viva_base.recipe import load_recipe

    return T.main(load_recipe(GRPOConfig, [*SMALL, *args]))


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _remote(url, *names, **client):
    return [f"rewards.{n}.server={url}" for n in names] + \
        [f"rewards.{n}.{k}={v}" for n in names for k, v in client.items()]


def test_served_clip_rewards_give_the_in_process_run(tmp_path, repo_root, monkeypatch, one_thread):
    """recipes/tiny.yaml's CLIP rewards served on 127.0.0.1: metrics.jsonl rewards equal the in-process run's to 1e-6
    and the LoRA is the same; with overlapped scoring of rollout chunks (one sample per chunk) too."""
    from rewards.serve import ServeConfig, build_served, start_server

    monkeypatch.chdir(repo_root)
    h = start_server(build_served({"clip_if": {"model": "tiny:hf"}, "clip_sp": {"model": "tiny:hf"}}),
                     ServeConfig(port=0, log_level="warning"))
    try:
        chunks = ["sampling.rollout_batch_size=1"]  # 4 rollout chunks of 1 sample: overlap has work to hide
        runs = {"local": [], "remote": _remote(h.url, "clip_if", "clip_sp"), "local_chunks": chunks,
                "overlap": [*_remote(h.url, "clip_if", "clip_sp"), "train.overlap_rewards=true", *chunks]}
        for name, extra in runs.items():
            _train([f"output_dir={tmp_path / name}", "train.num_iterations=2", *extra])
        stats = h.stats
    finally:
        h.stop()
    for name, ref in (("remote", "local"), ("overlap", "local_chunks")):
        base = _rows(tmp_path / ref)
        assert len(base) == 2 and all(r["nan_rewards"] == 0 for r in base)
        lora = load_file(str(tmp_path / ref / "lora" / "adapter_model.safetensors"))
        rows = _rows(tmp_path / name)
        for a, b in zip(base, rows):
            for key in ("reward", "reward/clip_if", "reward/clip_sp", "reward_std"):
                assert abs(a[key] - b[key]) <= 1e-6, (name, key, a[key], b[key])
        other = load_file(str(tmp_path / name / "lora" / "adapter_model.safetensors"))
        assert max((lora[k] - other[k]).abs().max().item() for k in lora) <= 1e-6, name
    # 2 rewards x 2 iterations: remote sends one request of 4 samples each; overlap one per completed group of 2
    assert stats["requests"] == 2 * 2 * 1 + 2 * 2 * 2 and stats["samples"] == 2 * (2 * 2 * 4)


def test_ready_samples_waits_for_whole_groups():
    groups = [0, 0, 1, 1, 2]
    assert ready_samples({0}, set(), groups) == []
    assert ready_samples({0, 1, 2}, set(), groups) == [0, 1]
    assert ready_samples({0, 1, 2, 3, 4}, {0, 1}, groups) == [2, 3, 4]


class _SlowReward:
    """Called like a CombinedReward: sleeps ``seconds`` per call, scores = mean pixel; records the calls."""

    def __init__(self, seconds):
        self.seconds, self.calls = seconds, []

    def __call__(self, edited, source, *, source_captions, target_captions, instructions, references, groups):
        from rewards.registry import CombinedOutput

        self.calls.append((list(groups), threading.current_thread().name))
        time.sleep(self.seconds)
        m = edited.mean(dim=(1, 2, 3, 4))
        return CombinedOutput(m * 2, {"mean": m}, {"mean": [{"g": g} for g in groups]}, {"mean": 2.0})


def test_overlap_hides_reward_time_behind_sampling_with_the_same_numbers():
    """4 chunks of 1 sample (groups of 2), 0.2 s of sampling each, a reward of 0.2 s per call: without overlap the
    reward runs after sampling (0.8 + 0.2 s); with overlap the first group scores while chunks 3-4 sample, so only the
    last call (0.2 s) remains after sampling. Scores, details and decoded pixels are identical."""
    g = torch.Generator().manual_seed(0)
    latents = torch.rand(4, 3, 1, 4, 4, generator=g)
    source = torch.rand(4, 1, 3, 4, 4, generator=g)
    texts = {k: [f"{k}{i}" for i in range(4)] for k in ("source_captions", "target_captions", "instructions")}

    def decode(z):
        return z.permute(0, 2, 1, 3, 4).clamp(0, 1)

    results, walls = {}, {}
    for overlap in (False, True):
        reward = _SlowReward(0.2)
        scorer = ChunkScorer(decode, reward, source=source, texts=texts, references=None, groups=[0, 0, 1, 1],
                             overlap=overlap)
        t = time.perf_counter()
        for i in range(4):
            time.sleep(0.2)                               # sampling chunk i
            scorer.add([i], latents[i:i + 1])
        results[overlap] = scorer.finish(latents, 1)
        walls[overlap] = time.perf_counter() - t
        if overlap:
            assert [c[0] for c in reward.calls] == [[0, 0], [1, 1]] and reward.calls[0][1].startswith("rewards")
        else:
            assert [c[0] for c in reward.calls] == [[0, 0, 1, 1]]
    (e0, s0), (e1, s1) = results[False], results[True]
    assert torch.equal(e0, e1) and torch.equal(s0.total, s1.total) and torch.equal(s0.components["mean"], s1.components["mean"])
    assert s0.details == s1.details and s1.weights == {"mean": 2.0}
    assert walls[False] >= 1.0 and walls[True] < 1.0 + 0.1 * 0.8, walls


def test_overlap_stops_after_a_failure():
    from rewards.remote import RemoteRewardError

    calls = []

    def reward(edited, source, **kw):
        calls.append(1)
        raise RemoteRewardError("server down")

    scorer = ChunkScorer(lambda z: z, reward, source=torch.zeros(4, 1, 3, 2, 2), references=None, overlap=True,
                         texts={k: ["x"] * 4 for k in ("source_captions", "target_captions", "instructions")},
                         groups=[0, 1, 2, 3])
    for i in range(4):
        scorer.add([i], torch.zeros(1, 1, 3, 2, 2))
    with pytest.raises(RemoteRewardError, match="server down"):
        scorer.finish(torch.zeros(4, 1, 3, 2, 2), 1)
    assert len(calls) == 1  # the queued chunks after the failure did no more requests


def _start_cli_server(repo_root, env=None):
    proc = subprocess.Popen([sys.executable, "-m", "rewards.serve", "recipe=recipes/tiny.yaml", "port=0",
                             "log_level=warning"], cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
    line = proc.stdout.readline()  # "reward server listening on http://127.0.0.1:PORT"
    if "listening on" not in line:
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {proc.stderr.read()[-2000:]}")
    return proc, line.strip().rsplit(" ", 1)[-1]


def test_server_killed_mid_run_nan_samples_then_a_clear_stop_with_the_checkpoint(tmp_path, repo_root, monkeypatch,
                                                                                   one_thread):
    """The CLI server is SIGKILLed after iteration 1: iteration 2's requests fail after their retries and all 4 samples
    are NaN (dropped, counted in metrics.jsonl); in iteration 3 the server counts as down (2 failed requests in a row):
    the run writes checkpoint-2 and stops with one message that says what happened and how to resume; resuming with
    a server on another port finishes the run."""
    from viva_base.errors import UserError
    from viva_base.training import MetricsFile

    monkeypatch.chdir(repo_root)
    proc, url = _start_cli_server(repo_root)
    try:
        import urllib.request

        assert json.loads(urllib.request.urlopen(url + "/health", timeout=30).read()) == {"status": "ok"}
        real_write = MetricsFile.write

        def write(self, row):
            real_write(self, row)
            if row["step"] == 1:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)

        monkeypatch.setattr(MetricsFile, "write", write)
        out = tmp_path / "run"
        with pytest.raises(UserError) as err:
            _train([f"output_dir={out}", "train.num_iterations=4",
                    *_remote(url, "clip_if", "clip_sp", max_retries=2, backoff=0.05, timeout=10, give_up_after=2)])
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("stopped in iteration 3: reward server " + url)
    assert "is down: 2 requests in a row failed after 2 retries each (last error: cannot reach" in msg
    assert f"the last checkpoint is {out / 'checkpoint-2'} (2 iterations done)" in msg and "resume=latest" in msg
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["nan_rewards"] == 0 and rows[1]["nan_rewards"] == 4          # every sample of iteration 2 dropped
    assert (out / "checkpoint-2" / "trainer_state.json").exists() and not (out / "lora").exists()

    # a new server on another port (its address is no part of the run's identity): resume=latest finishes the run
    from rewards.serve import ServeConfig, build_served, start_server

    monkeypatch.setattr(MetricsFile, "write", real_write)
    h = start_server(build_served({"clip_if": {"model": "tiny:hf"}, "clip_sp": {"model": "tiny:hf"}}),
                     ServeConfig(port=0, log_level="warning"))
    try:
        _train([f"output_dir={out}", "train.num_iterations=4", "resume=latest", *_remote(h.url, "clip_if", "clip_sp")])
    finally:
        h.stop()
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[2]["nan_rewards"] == 0 and (out / "lora").exists()
