"""benchmarks.perf: the floor accounting records exactly the passes an Edit-GRPO iteration runs (no timing asserts)."""
from __future__ import annotations

import json
import math

import pytest


def test_fit_power_law_recovers_the_exponent():
    from benchmarks.perf import fit_power_law

    xs = [2, 4, 8, 16]
    assert fit_power_law(xs, [3.0 * x ** 1.7 for x in xs]) == pytest.approx(1.7, abs=1e-12)
    with pytest.raises(ValueError, match="two different x"):
        fit_power_law([3, 3], [1, 2])


def test_floor_is_calls_times_seconds():
    from benchmarks.perf import floor_seconds

    assert floor_seconds({"a": 3, "b": 2}, {"a": 0.5, "b": 0.25, "c": 9.0}) == 2.0
    with pytest.raises(KeyError, match="no timing"):
        floor_seconds({"d": 1}, {"a": 1.0})


def test_a_real_iteration_runs_the_minimal_passes(tmp_path):
    """One tiny iteration, recorded: CFG in one forward (batch 2 x rollout batch), rollouts batched over the group,
    each prompt's condition built once, one reference (KL) forward per trained forward; FLOPs counted per pass."""
    from benchmarks.perf import CASES, run_case

    P, G, steps = 2, 2, 3
    r = run_case("tiny", [*CASES["tiny"], f"train.prompts_per_iteration={P}", f"train.num_generations={G}",
                          f"sampling.num_steps={steps}", "sampling.sde_window_size=1", "data.toy_prompts=4"],
                 iterations=2, reps=1, workdir=tmp_path)
    calls = r["pass_calls_per_iteration"]
    n, rollout_bs = P * G, G                       # 1 process; rollout batch = a whole group
    grid = "9x16x16"                               # 9 frames of 32x32 -> pixel VAE (x2) -> 16x16 latents
    assert calls == {
        f"conditions[prompts={P}]": 1,
        f"dit_sample[b={2 * rollout_bs},{grid}]": steps * math.ceil(n / rollout_bs),
        f"dit_train[b={2 * rollout_bs},{grid}]": math.ceil(n / rollout_bs) * 1,   # 1 trained step (window 1)
        f"dit_sample_ref[b={2 * rollout_bs},{grid}]": math.ceil(n / rollout_bs) * 1,
        f"decode[b={rollout_bs}]": math.ceil(n / rollout_bs),
        f"rewards[b={n}]": 1,
    }
    assert r["calls_per_iteration"]["instructor"] == P and r["calls_per_iteration"]["vae_encode"] == P
    assert r["calls_ok"]
    assert r["floor_seconds"] > 0 and r["iteration_seconds"] > 0 and r["peak_memory_bytes"] >= 0
    f = r["pass_flops"]
    sample, train = f[f"dit_sample[b={2 * rollout_bs},{grid}]"], f[f"dit_train[b={2 * rollout_bs},{grid}]"]
    ref = f[f"dit_sample_ref[b={2 * rollout_bs},{grid}]"]
    assert 0 < sample["attention"] < sample["total"]
    assert ref["total"] < sample["total"]          # the adapter-disabled forward skips the LoRA matmuls
    assert 2 * sample["total"] < train["total"] < 4 * sample["total"]  # forward + backward
    assert r["dit_flops_per_iteration"]["total"] == sum(n_ * f[k]["total"] for k, n_ in calls.items() if k in f)


def test_the_toy_case_runs_with_its_toy_oracle_reward(tmp_path):
    """The toy case (recipes/toy.yaml's Edit-GRPO stage, with its toy_oracle reward reading the case's own prompts
    instead of the chain's ``manifest: toy``) runs; smaller than --quick: 2 prompts x 2 samples, 3 steps."""
    from benchmarks.perf import CASES, run_case

    r = run_case("toy", [*CASES["toy"], "train.prompts_per_iteration=2", "train.num_generations=2",
                         "sampling.num_steps=3", "sampling.sde_window_size=1", "sampling.sde_window_range=[0,1]",
                         "train.minibatches_per_iteration=1", "data.toy_prompts=2"],
                 iterations=2, reps=1, workdir=tmp_path)
    assert r["calls_ok"] and r["overhead"] > 0
    assert any(k.startswith("rewards[") for k in r["pass_calls_per_iteration"])
    import json

    rows = [json.loads(line) for line in (tmp_path / "toy" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(0 <= row["reward/toy_oracle"] <= 1 for row in rows)  # the oracle scored every iteration


def test_overlap_measurement_hides_a_slow_remote_reward(tmp_path):
    """benchmarks.perf --overlap, small: 3 rollout chunks, a remote reward of 0.4 s per chunk. Scored after sampling
    it adds ~3 x 0.4 s to an iteration; overlapped, the calls of chunks 1-2 run while later chunks sample. Loose
    margins: the differences asserted are sleeps of 0.4 s, not compute."""
    from benchmarks.perf import exposed_fraction, run_overlap

    assert exposed_fraction(10.5, 10.0, 5.0) == 0.1 and exposed_fraction(9.0, 10.0, 5.0) == 0.0
    r = run_overlap(0.4, iterations=2, workdir=tmp_path, overrides=[
        "data.toy_prompts=3", "train.prompts_per_iteration=3", "sampling.num_steps=6"])
    assert r["chunks"] == 3 and set(r["runs"]) == {"no_slow_reward", "after_sampling", "overlapped"}
    assert r["server_stats"]["batch_sizes"] == {"2": r["server_stats"]["batches"]}   # one chunk per server batch
    # the wait after the last sampling forward (robust to a busy machine, unlike whole-iteration differences):
    # all 3 sleeps without overlap, about the last one with it
    wait = {k: v["scoring_wait_seconds"] for k, v in r["runs"].items()}
    assert wait["after_sampling"] > 3 * 0.4 and wait["overlapped"] < wait["after_sampling"] - 0.4, wait
    assert r["sampling_seconds"] > 0


def test_the_command_runs_from_any_folder_with_a_relative_out(tmp_path, monkeypatch, capsys):
    """Each case runs in a process of its own started in the package's folder; a relative ``--out`` was passed on as
    it was, so from any other folder the parent looked for the case's result where the case had not written it
    (FileNotFoundError after the whole case had run). Smaller than the shipped tiny case: 2 prompts x 2 samples."""
    from benchmarks import perf

    monkeypatch.setitem(perf.CASES, "tiny", [*perf.CASES["tiny"], "data.toy_prompts=2",
                                             "train.prompts_per_iteration=2", "train.num_generations=2",
                                             "sampling.num_steps=3", "sampling.sde_window_size=1",
                                             "sampling.sde_window_range=[0,1]", "train.minibatches_per_iteration=1"])
    monkeypatch.chdir(tmp_path)
    assert perf.main(["--cases", "tiny", "--no-sweeps", "--iterations", "2", "--reps", "1", "--out", "rel"]) == 0
    report = json.loads((tmp_path / "rel" / "perf.json").read_text())
    assert [r["case"] for r in report["results"]] == ["tiny"] and report["results"][0]["calls_ok"]
    assert f"written {tmp_path / 'rel' / 'perf.json'}" in capsys.readouterr().out


@pytest.mark.parametrize("args, words", [(["--iterations", "1"], "--iterations 1: give at least 2"),
                                         (["--reps", "0"], "--reps 0: give at least 1"),
                                         (["--out", "/proc/no/such"],
                                          "--out /proc/no/such: cannot create folders in /proc")])
def test_a_bad_value_is_one_line_before_any_case_runs(tmp_path, monkeypatch, capsys, args, words):
    from benchmarks import perf

    monkeypatch.chdir(tmp_path)
    try:
        code = perf.main(["--cases", "tiny", *args])
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
