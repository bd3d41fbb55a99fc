"""benchmarks.toybench --sft-seeds: the toy chain once per SFT training seed, and the spread of its numbers."""
import json
import statistics

import pytest
from omegaconf import OmegaConf

from benchmarks.toybench import SFT_COLUMNS, main, parse_args, sft_seed_markdown, sft_seed_table


def _report(simple, source, sp, delta, types):
    """A report.json holding what the table reads (the chain writes these keys: editgrpo.report)."""
    groups = {"all": {"oracle": simple - 0.05, "sp_error": sp}, "split/simple": {"oracle": simple, "sp_error": sp / 2},
              **{f"type/{t}": {"oracle": o} for t, o in types.items()}, "type/compound": {"oracle": 0.0}}
    return {"groups": {"sft": groups}, "copy_source_groups": {"split/simple": {"oracle": source},
                                                              **{f"type/{t}": {"oracle": 0.8} for t in types},
                                                              "type/compound": {"oracle": 0.9}},
            "if_progress": {"simple": {"sft": 0.6}},
            "delta_oracle": {"mean": delta, "ci95": [delta - 0.01, delta + 0.01]}}


def test_the_table_reads_each_seeds_report_and_summarises_the_spread():
    reports = {2: _report(0.93, 0.84, 0.04, -0.001, {"add": 0.9, "remove": 0.79}),
               0: _report(0.92, 0.84, 0.05, 0.002, {"add": 0.81, "remove": 0.95})}
    t = sft_seed_table(reports)
    assert [r["seed"] for r in t["rows"]] == [0, 2]
    r0, r2 = t["rows"]
    assert r0["simple oracle"] == 0.92 and r0["source, simple"] == 0.84 and r0["sp_error"] == 0.05
    assert r0["simple sp_error"] == 0.025 and r0["simple if_progress"] == 0.6 and r0["GRPO delta"] == 0.002
    # the compound column is "compound", not a simple edit type; remove 0.79 is below the source's 0.8
    assert (r0["types"], r0["types_above_source"], r2["types_above_source"]) == (2, 2, 1)
    s = t["summary"]["simple oracle"]
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.925) and (s["min"], s["max"]) == (0.92, 0.93)
    assert s["std"] == pytest.approx(statistics.stdev([0.92, 0.93])) == pytest.approx(0.01 / 2 ** 0.5)
    # columns no report has (no compound prompts evaluated) are left out, not shown as zeros
    assert "compound seen" not in t["summary"] and r0["compound seen"] is None
    md = sft_seed_markdown(t)
    assert "| 0 | 0.9200 | 0.8400 |" in md and "| 2/2 | [-0.0080, +0.0120] |" in md
    assert "compound seen" not in md and "| mean | 0.9250 |" in md
    assert [n for n, _ in SFT_COLUMNS][:2] == ["simple oracle", "source, simple"]
    # the preservation split of a report that has it (editgrpo.report's "preservation"), next to sp_error
    reports[0]["preservation"] = {"all": {"sp_boundary": {"sft": 0.09, "grpo": 0.08},
                                          "sp_interior": {"sft": 0.03, "grpo": 0.02}}}
    t = sft_seed_table(reports)
    assert t["rows"][0]["sp_error at the boundary"] == 0.09 and t["rows"][0]["sp_error interior"] == 0.03
    assert t["rows"][1]["sp_error at the boundary"] is None and t["summary"]["sp_error interior"]["n"] == 1
    # the compound prompts with a background edit and two more operations (editgrpo.evaluate.item_groups)
    reports[2]["groups"]["sft"]["ops/3/background"] = {"sp_error": 0.11}
    t = sft_seed_table(reports)
    col = "sp_error, 3 ops with background"
    assert t["rows"][1][col] == 0.11 and t["rows"][0][col] is None and t["summary"][col]["mean"] == 0.11
    assert f" {col} |" in sft_seed_markdown(t).splitlines()[0]


def test_seed_flags():
    a = parse_args(["--out", "o", "--sft-seeds", "0", "3", "toy.n_grpo=8"])
    assert a.sft_seeds == [0, 3] and a.seeds is None and a.overrides == ["toy.n_grpo=8"]
    assert parse_args([]).seeds == [0, 1, 2] and parse_args([]).sft_seeds is None
    for bad in (["--sft-seeds", "x"], ["--seeds", "1", "--sft-seeds", "2"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


@pytest.mark.parametrize("args, words", [
    (["--sft-seeds", "1", "train.learnig_rate=1"], "did you mean 'train.learning_rate'"),
    (["--recipe", "recipes/tiny.yaml", "--sft-seeds", "1"], "toy.enabled: true"),
    (["--seeds", "1", "rewards.nope.weight=1"], "unknown reward 'nope'"),
    (["--seeds", "1", "--out", "/proc/no/such"], "--out /proc/no/such: cannot create folders in /proc"),
])
def test_a_bad_recipe_is_one_line_and_exit_2_before_any_stage(args, words, tmp_path, repo_root, monkeypatch, capsys):
    monkeypatch.chdir(repo_root)
    assert main(["--out", str(tmp_path / "bench"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "bench").exists()


@pytest.mark.slow
def test_one_chain_per_sft_seed_sharing_the_chains_stages(tmp_path, repo_root, monkeypatch):
    """Two SFT seeds of a shrunk toy chain: the seed of the chain's own SFT stage reuses ``--out/sft``, the other
    trains its own; data, toy CLIP and instructor are built once; the table holds each run's own report."""
    monkeypatch.chdir(repo_root)
    out = tmp_path / "bench"
    shrink = ["report_to=none", "toy.n_sft_video=4", "toy.n_sft_image=4", "toy.n_grpo=2", "toy.n_eval_compound=2",
              "toy.n_eval_simple=2", "toy.reward_steps=5", "toy.instructor_steps=3", "toy.instructor_compound=4",
              "toy.sft_overrides=[train.max_steps=3,train.checkpoint_every=0,train.compile=none]",
              "train.num_iterations=1", "train.prompts_per_iteration=2", "train.num_generations=2",
              "sampling.num_steps=3", "sampling.sde_window_size=1", "sampling.sde_window_range=[0,1]",
              "eval.num_steps=2", "eval.seeds=[1]", "eval.save_videos=0"]
    assert main(["--out", str(out), "--sft-seeds", "0", "1", *shrink]) == 0
    s0, s1 = out / "sft-seed-0", out / "sft-seed-1"
    assert (s0 / "sft").is_symlink() and (s0 / "sft").resolve() == (out / "sft").resolve()
    assert not (s1 / "sft").is_symlink() and OmegaConf.load(s1 / "sft" / "config.yaml").train.seed == 1
    assert OmegaConf.load(out / "sft" / "config.yaml").train.seed == 0
    for name in ("data", "reward_model", "instructor"):
        assert (s0 / name).resolve() == (s1 / name).resolve() == (out / name).resolve()
    res = json.loads((out / "sftbench.json").read_text())
    reps = [json.loads((d / "report.json").read_text()) for d in (s0, s1)]
    assert [r["seed"] for r in res["rows"]] == [0, 1]
    assert [r["simple oracle"] for r in res["rows"]] == [r["groups"]["sft"]["split/simple"]["oracle"] for r in reps]
    assert res["rows"][0]["simple oracle"] != res["rows"][1]["simple oracle"]  # another training seed, another editor
    assert res["grpo_pooled"]["n_runs"] == 2 and "| 1 |" in (out / "sftbench.md").read_text()
