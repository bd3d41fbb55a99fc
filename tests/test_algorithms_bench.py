"""benchmarks/algorithms.py: curves and the time-to-quality table from run folders (hand-made), and --quick end to end."""
import json

import pytest

from benchmarks import algorithms as A


def _fake_run(root, name, seed, oracle_by_step, reward_by_step, seconds, prompts=("a", "b")):
    """A run folder as the trainer writes it: eval/step-<k>/{items.jsonl, summary.json}, metrics.jsonl, config.yaml.
    Prompt 'a' gets the step's oracle value, prompt 'b' that value + 0.1 (same gains); both
    get if_error 0.5 - 2 x the step's oracle value."""
    run = root / "algorithms" / name / f"seed-{seed}"
    for step, o in oracle_by_step.items():
        d = run / "eval" / f"step-{step}"
        d.mkdir(parents=True)
        rows = [{"id": p, "split": "compound", "mean": {"oracle": o + 0.1 * i, "reward": reward_by_step[step],
                                                        "if_error": 0.5 - 2 * o}}
                for i, p in enumerate(prompts)]
        (d / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / "summary.json").write_text("{}")
    n = max(oracle_by_step)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s + 1, "seconds": seconds}) + "\n" for s in range(n)))
    (run / "config.yaml").write_text("train:\n  prompts_per_iteration: 2\n  num_generations: 4\n")
    return run


def test_time_to_quality_table_from_run_folders(tmp_path):
    # grpo: oracle gain 0.02 at step 2, 0.04 at step 4, 10 s an iteration (40 s in all): target 0.04, budget 40 s
    grpo = [_fake_run(tmp_path, "grpo", s, {0: 0.5, 2: 0.52, 4: 0.54}, {0: 1.0, 2: 1.1, 4: 1.2}, 10.0) for s in (0, 1)]
    # nft: gain 0.05 at step 2 (10 s: reaches the target in 10 s, 4x faster), 0.03 at step 4 (20 s)
    nft = [_fake_run(tmp_path, "nft", s, {0: 0.5, 2: 0.55, 4: 0.53}, {0: 1.0, 2: 1.0, 4: 1.3}, 5.0) for s in (0, 1)]
    # awm: oracle falls while the proxy rises; 30 s an iteration: only step 0 fits in the 40 s budget
    awm = [_fake_run(tmp_path, "awm", s, {0: 0.5, 2: 0.49, 4: 0.45}, {0: 1.0, 2: 1.2, 4: 1.4}, 30.0) for s in (0, 1)]
    curves = {name: A.curve(runs, n_boot=50) for name, runs in (("grpo", grpo), ("nft", nft), ("awm", awm))}
    assert [p["step"] for p in curves["grpo"]] == [0, 2, 4]
    assert [p["seconds"] for p in curves["grpo"]] == [0.0, 20.0, 40.0]
    assert [p["rollouts"] for p in curves["nft"]] == [0, 16, 32]
    assert curves["grpo"][-1]["oracle"]["mean"] == pytest.approx(0.04)
    assert curves["awm"][-1]["proxy"]["mean"] == pytest.approx(0.4)
    finals = {name: A.pooled_delta(runs, n_boot=50) for name, runs in (("grpo", grpo), ("nft", nft), ("awm", awm))}
    s = A.summarize(curves, finals)
    assert s["target_oracle_gain"] == pytest.approx(0.04) and s["budget_seconds"] == 40.0
    g, n, a = (s["configs"][k] for k in ("grpo", "nft", "awm"))
    assert g["seconds_to_reference_gain"] == 40.0 and g["speedup_vs_reference"] == pytest.approx(1.0)
    assert n["seconds_to_reference_gain"] == 10.0 and n["speedup_vs_reference"] == pytest.approx(4.0)
    assert n["oracle_gain_at_budget"]["mean"] == pytest.approx(0.03)  # its last evaluation within 40 s (20 s)
    assert a["seconds_to_reference_gain"] is None and a["oracle_gain_at_budget"]["mean"] == 0.0
    assert a["oracle_falls_while_proxy_rises"] and not n["oracle_falls_while_proxy_rises"]
    assert n["final_oracle_gain"]["mean"] == pytest.approx(0.03)
    # if_error here falls twice as fast as the oracle rises: -0.06 for nft's final +0.03, +0.10 for awm's -0.05
    assert n["final_if_error_change"]["mean"] == pytest.approx(-0.06)
    assert a["final_if_error_change"]["mean"] == pytest.approx(0.10)
    md = A.table_md(s, 2)
    assert md.count("\n| ") == 4 and "| nft |" in md and "4.00x" in md and "never" in md and "YES" in md
    assert "| nft | +0.0300 [+0.0300, +0.0300] | -0.0600 [-0.0600, -0.0600] |" in md
    A.plot(curves, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_arguments():
    args = A.parse_args(["--seeds", "0", "1", "--configs", "nft", "awm", "train.beta=0"])
    assert args.seeds == [0, 1] and args.configs == ["grpo", "nft", "awm"] and args.overrides == ["train.beta=0"]
    assert A.parse_args(["--quick"]).configs == list(A.CONFIGS)
    assert set(A.DEFAULT_CONFIGS) == {"grpo", "flow_grpo", "grpo_prefix", "nft", "awm"}
    with pytest.raises(SystemExit):
        A.parse_args(["--configs", "ppo"])


@pytest.mark.slow
def test_every_configurations_recipe_is_checked_before_the_first_trains(tmp_path, repo_root, monkeypatch, capsys):
    """A wrong override was a traceback from the first configuration's load (or, for one configuration's own keys,
    after the configurations before it had trained: hours); now each configuration's recipe is checked first, and
    the error is one line naming the configuration, exit 2, nothing trained."""
    monkeypatch.chdir(repo_root)

    def no_training(*args, **kwargs):
        raise AssertionError("a configuration was trained")

    monkeypatch.setattr(A, "run", no_training)
    out = tmp_path / "toy"
    assert A.main(["--quick", "--out", str(out), "train.bogus=1"]) == 2
    assert capsys.readouterr().err.startswith("error: configuration grpo: unknown recipe key 'train.bogus'")
    # nft needs train.advantage_clip: the configurations before it would have trained first
    assert A.main(["--configs", "nft", "--out", str(out), "train.advantage_clip=null"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: configuration nft: train.algorithm=nft needs train.advantage_clip")
    assert A.main(["--out", str(out), "--recipe", "recipes/tiny.yaml"]) == 2
    assert "the benchmark runs the toy chain" in capsys.readouterr().err
    assert not out.exists()
    assert A.main(["--quick", "--out", "/proc/no/such"]) == 2  # an OSError traceback before
    assert capsys.readouterr().err.startswith("error: --out /proc/no/such: cannot create folders in /proc")


def test_quick_mode_runs_every_configuration(tmp_path, repo_root, monkeypatch):
    """--quick: the shrunk toy chain once, then every configuration on one training seed (pooling over seeds is the
    hand-made test's); the table lists all of them."""
    monkeypatch.chdir(repo_root)
    out = tmp_path / "q"
    assert A.main(["--quick", "--out", str(out), "--seeds", "0"]) == 0
    result = json.loads((out / "algorithms" / "algorithms.json").read_text())
    assert set(result["configs"]) == set(A.CONFIGS) and result["seeds"] == [0]
    for name, pts in result["curves"].items():
        assert [p["step"] for p in pts] == [0, 1, 2], name
        assert pts[-1]["rollouts"] == 2 * 2 * 2
    md = (out / "algorithms" / "algorithms.md").read_text()
    assert all(f"| {name} |" in md for name in A.CONFIGS)
    assert (out / "algorithms" / "curves.png").exists()
    assert len(list((out / "algorithms").glob("*/seed-*/sft"))) == len(A.CONFIGS)


def test_two_benchmark_processes_never_train_the_same_run_at_once(tmp_path):
    """Two benchmark processes on one --out (each trains the reference grpo runs) once trained grpo/seed-1 at the
    same time, in the same folder. Now the second waits on the run's lock, then finds it finished and reuses it."""
    import subprocess
    import sys
    import time

    from benchmarks.toybench import SHARED, run_lock, train_linked_run

    run = tmp_path / "algorithms" / "grpo" / "seed-1"
    marker = tmp_path / "second-got-the-lock"
    code = ("import sys; from pathlib import Path; from benchmarks.toybench import run_lock\n"
            "with run_lock(Path(sys.argv[1])): Path(sys.argv[2]).write_text('x')\n")
    with run_lock(run):
        second = subprocess.Popen([sys.executable, "-c", code, str(run), str(marker)])
        time.sleep(3.0)
        assert not marker.exists() and second.poll() is None  # waiting for the first
    assert second.wait(timeout=60) == 0 and marker.exists()
    # a finished run (report.json) is reused: nothing is loaded or trained, the chain stages are linked
    (run / "report.json").write_text("{}")
    train_linked_run(tmp_path, run, ["recipe=/no/such/recipe.yaml"])
    assert all((run / name).is_symlink() and (tmp_path / name).is_dir() for name in SHARED)
