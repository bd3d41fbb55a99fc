"""The editor diagnostics (editgrpo.diagnose), the source-residual prediction, the report's copy-source
baseline and video logging to the trackers."""
import json

import pytest
import torch

from editgrpo.diagnose import clean_latent_errors, group_spread, main as diagnose_main
from viva_base.data.manifest import read_manifest
from viva_base.data.toy import ensure_toy_dataset
from viva_base.model import source_residual_velocity
from viva_base.tiny import TinySpec, make_tiny_editor


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return ensure_toy_dataset(root, seed=5, n_sft_video=6, n_sft_image=0, n_grpo=0, n_eval_compound=2,
                              n_eval_simple=2, frames=5, size=32)


def test_source_residual_velocity_is_the_flow_velocity_of_its_clean_latent():
    g = torch.Generator().manual_seed(0)
    x0, z_src, noise = (torch.randn(3, 4, 2, 3, 3, generator=g) for _ in range(3))
    sigma = torch.tensor([0.9, 0.3, 0.05])
    z_t = (1 - sigma.view(-1, 1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1, 1) * noise
    v = source_residual_velocity(z_t, z_src, x0 - z_src, sigma)
    assert torch.allclose(v, noise - x0, atol=1e-5)
    # a zero output is an exact copy of the source: x0 = z_t - sigma v = z_src
    v0 = source_residual_velocity(z_t, z_src, torch.zeros_like(x0), sigma)
    assert torch.allclose(z_t - sigma.view(-1, 1, 1, 1, 1) * v0, z_src, atol=1e-6)


def test_clean_latent_errors_of_an_editor_that_copies_its_source(toy):
    """adaLN-Zero + source_residual: the untrained editor outputs delta = 0, i.e. copies the source exactly, so the
    error outside the edit region is 0 at every sigma and inside it equals the error of copying the source."""
    editor = make_tiny_editor(TinySpec(init="adaln_zero", prediction="source_residual"))
    recs = read_manifest(toy["sft"], "pairs")
    res = clean_latent_errors(editor, recs, (0.9, 0.5, 0.1), batch_size=4)
    assert res["n"] == 6 and 0.1 < res["latent_std"] < 1.0
    for row in res["rows"]:
        assert row["outside"] < 1e-5
        assert row["inside"] == pytest.approx(res["copy_source_inside"], rel=1e-4)
    # a velocity editor with random weights does not copy
    rand = clean_latent_errors(make_tiny_editor(), recs, (0.9,), batch_size=4)
    assert rand["rows"][0]["outside"] > 0.05


def test_group_spread_and_cli(toy, tmp_path, capsys):
    editor = make_tiny_editor(TinySpec(init="adaln_zero", prediction="source_residual"))
    recs = read_manifest(toy["eval"], "eval")
    res = group_spread(editor, recs, groups=2, group_size=3, num_steps=3)
    rows = {r["score"]: r for r in res["rows"]}
    assert {"oracle", "if_error", "sp_error"} <= set(rows)
    # an exact copier is deterministic whatever the noise: nothing to rank within a group
    assert rows["oracle"]["within_group_std"] < 1e-5
    assert all("rank_vs_oracle" not in r for r in rows.values())  # constant groups carry no ranking
    # a random editor's samples differ: the oracle ranks itself perfectly, its error terms against it
    noisy = {r["score"]: r for r in group_spread(make_tiny_editor(), recs, groups=2, group_size=4,
                                                  num_steps=3)["rows"]}
    assert noisy["oracle"]["rank_vs_oracle"] == pytest.approx(1.0)
    assert -1.0 <= noisy["if_error"]["rank_vs_oracle"] <= 0.0 or -1.0 <= noisy["sp_error"]["rank_vs_oracle"] <= 0.0
    editor.save_pretrained(tmp_path / "ed")
    out = tmp_path / "diag.json"
    assert diagnose_main(["--model", str(tmp_path / "ed"), "--manifest", str(toy["eval"]), "--groups", "1",
                          "--group-size", "2", "--num-steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "clean-latent error" in printed and "within-group spread" in printed
    assert set(json.loads(out.read_text())) >= {"clean_latent", "group_spread"}
    assert diagnose_main(["--model", str(tmp_path / "ed"), "--manifest", str(tmp_path / "nope.jsonl")]) == 2


def test_report_copy_source_is_the_oracle_of_returning_the_source(toy):
    from editgrpo.report import comparison_table, copy_source_groups
    from viva_base.data.toyworld.oracle import oracle_scores
    from viva_base.video import read_video

    groups = copy_source_groups(toy["eval"])
    recs = read_manifest(toy["eval"], "eval")
    want = []
    for r in recs:
        s, t = read_video(r["source"]).frames[None], read_video(r["target"]).frames[None]
        m = (read_video(r["mask"]).frames.amax(dim=1, keepdim=True) > 0.5).float()[None]
        want.append(float(oracle_scores(s, s, t, m)["oracle"][0]))
    assert groups["all"]["n"] == len(recs)
    assert groups["all"]["oracle"] == pytest.approx(sum(want) / len(want))
    assert groups["all"]["sp_error"] == 0 and groups["all"]["if_progress"] == pytest.approx(0.0, abs=1e-6)
    # the compound prompts by number of operations and background or not, as the evaluation groups them
    by_ops: dict = {}
    for r, w in zip(recs, want):
        ops = [op["op"] for op in r.get("ops") or []]
        if len(ops) > 1:
            by_ops.setdefault(f"ops/{len(ops)}/{'background' if 'background' in ops else 'objects'}", []).append(w)
    assert by_ops and {g for g in groups if g.startswith("ops/")} == set(by_ops)
    for g, ws in by_ops.items():
        assert groups[g]["n"] == len(ws) and groups[g]["oracle"] == pytest.approx(sum(ws) / len(ws))
    table = comparison_table(groups, groups, ["oracle", "reward"], source=groups)
    assert table.splitlines()[0].startswith("| group | n | oracle source | oracle SFT | oracle GRPO | reward SFT")


def test_log_videos_to_tensorboard(tmp_path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from viva_base.training import log_videos

    acc = Accelerator(log_with="tensorboard", project_config=ProjectConfiguration(project_dir=str(tmp_path),
                                                                                  logging_dir=str(tmp_path / "logs")))
    acc.init_trackers("t")
    clip = torch.rand(5, 3, 16, 16)
    # a real-size clip (33 frames of 480 x 848; 40 megapixels side by side) is shrunk to 256 px, 8 frames
    real = torch.rand(33, 3, 480, 848)
    assert log_videos(acc, {"eval/x": clip, "rollout/real": real}, step=3) == 2
    acc.end_training()
    ev = EventAccumulator(str(next((tmp_path / "logs").rglob("events.*")).parent), size_guidance={"images": 0})
    ev.Reload()
    assert {"eval/x", "rollout/real"} <= set(ev.Tags()["images"])
    img = ev.Images("eval/x")[0]
    assert img.step == 3 and (img.width, img.height) == (5 * 16 * 4, 16 * 4)
    big = ev.Images("rollout/real")[0]
    assert (big.width, big.height) == (8 * 256, 145)  # 480 x 848 -> 145 x 256


def test_tiny_spec_init_prediction_and_instructor_scale():
    from viva_base.errors import CheckpointError

    ed = make_tiny_editor(TinySpec(init="adaln_zero"))
    z, src = torch.randn(1, 12, 5, 16, 16), torch.rand(1, 5, 3, 32, 32)
    cond, _ = ed.encode_condition(src, ["make it night"], with_uncond=False)
    assert ed.velocity(z, 0.5, cond).abs().max() == 0  # every branch gated off, output layer at zero
    ed.config.prediction = "epsilon"
    with pytest.raises(CheckpointError, match="prediction"):
        ed.velocity(z, 0.5, cond)
    with pytest.raises(ValueError, match="init"):
        make_tiny_editor(TinySpec(init="xavier"))
    std = make_tiny_editor(TinySpec(instructor_init_std=0.1)).instructor.get_input_embeddings().weight.std()
    assert 0.09 < float(std) < 0.11


def test_rewards_model_toy_is_the_chains_clip(toy, tmp_path, capsys):
    """--rewards recipes/toy.yaml (model: toy) once looked 'toy' up on the hub and died with a traceback: it names
    the chain's CLIP in the recipe's output_dir/reward_model, and its absence is one clear line."""
    from editgrpo.diagnose import resolve_toy_rewards

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path}/run\nrewards:\n  clip_if: {{weight: 1.0, model: toy}}\n")
    editor = make_tiny_editor(TinySpec(init="adaln_zero", prediction="source_residual"))
    editor.save_pretrained(tmp_path / "ed")
    assert diagnose_main(["--model", str(tmp_path / "ed"), "--manifest", str(toy["eval"]), "--groups", "1",
                          "--group-size", "2", "--num-steps", "1", "--rewards", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --rewards") and "reward_model" in err and "editgrpo.train" in err
    (tmp_path / "run" / "reward_model").mkdir(parents=True)
    (tmp_path / "run" / "reward_model" / "open_clip_config.json").write_text("{}")
    got = resolve_toy_rewards({"clip_if": {"weight": 1.0, "model": "toy"}, "pixel_sp": {"weight": 1.0}},
                              f"{tmp_path}/run", str(recipe))
    assert got == {"clip_if": {"weight": 1.0, "model": f"open_clip:local-dir:{tmp_path}/run/reward_model"},
                   "pixel_sp": {"weight": 1.0}}


def test_a_missing_rewards_recipe_is_one_line_before_the_editor_loads(toy, tmp_path, capsys, monkeypatch):
    """--rewards nope.yaml died with a FileNotFoundError traceback after the editor had loaded; now one line first.
    recipes/<name>.yaml reads the shipped recipe from any folder, as the training commands do."""
    monkeypatch.chdir(tmp_path)

    def no_editor(*args, **kwargs):
        raise AssertionError("the editor was loaded")

    monkeypatch.setattr("viva_base.training.load_editor", no_editor)
    args = ["--model", str(tmp_path / "ed"), "--manifest", str(toy["eval"]), "--groups", "1", "--rewards"]
    assert diagnose_main([*args, "recipes/tiny.yaml", "--out", "/proc/no/d.json"]) == 2  # a traceback at the end
    assert capsys.readouterr().err.startswith("error: --out /proc/no/d.json: cannot create folders in /proc")
    assert diagnose_main([*args, "recipes/tiny.yaml", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out {tmp_path}: that is a folder; give a file name"
    assert diagnose_main([*args, "nope.yaml"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --rewards: recipe file 'nope.yaml' not found: pass recipe=PATH to a YAML file, or a shipped recipe "
        "(recipes/<name>.yaml: data_build, lucy_grpo, lucy_tiny, sft_tiny, sft_toy, sft_viva, tiny, toy, viva; "
        "`python -m editgrpo.recipes` lists and copies them)")
    (tmp_path / "empty.yaml").write_text("output_dir: x\n")
    assert diagnose_main([*args, "empty.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "error: --rewards empty.yaml: the recipe has no rewards block"
    # the shipped toy recipe, from a folder without recipes/: found, and its toy CLIP looked for in outputs/toy
    assert diagnose_main([*args, "recipes/toy.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --rewards recipes/toy.yaml: rewards.clip_if.model=toy") and "outputs/toy" in err
