"""Held-out evaluation (proxy + oracle), the end-of-run report, and a smoke run of the whole toy chain."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from editgrpo.config import EvalConfig, GRPOConfig
from editgrpo.evaluate import Evaluator, load_eval
from editgrpo.report import write_report
from rewards.registry import CombinedReward
from test_sft import _spy_on_compile
from viva_base.data.toy import ensure_toy_dataset
from viva_base.data.toyworld.oracle import bootstrap_ci
from viva_base.recipe import load_recipe
from viva_base.tiny import make_tiny_editor
from viva_base.video import read_video


@pytest.fixture(scope="module")
def toy_eval(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return ensure_toy_dataset(root, seed=3, n_sft_video=0, n_sft_image=0, n_grpo=0, n_eval_compound=3,
                              n_eval_simple=2)


def test_evaluator_and_report(toy_eval, tmp_path):
    cfg = OmegaConf.structured(EvalConfig)
    cfg.manifest, cfg.seeds, cfg.num_steps, cfg.batch_size, cfg.save_videos = str(toy_eval["eval"]), [1, 2], 2, 4, 3
    reward = CombinedReward.from_config({"clip_sp": {"weight": 1.0, "model": "tiny:hf"}})
    ev = Evaluator(cfg, reward, tmp_path / "eval")
    editor = make_tiny_editor(seed=0)
    s0 = ev.run(editor, step=0)
    assert s0["oracle_available"] and s0["groups"]["all"]["n"] == 5
    assert {"split/compound", "split/simple"} <= set(s0["groups"])
    rows, _ = load_eval(tmp_path / "eval" / "step-0")
    assert len(rows) == 5 and all(len(r["scores"]["oracle"]) == 2 for r in rows)
    # deterministic: the same policy and seeds give the same scores
    assert ev.run(editor, step=7)["groups"]["all"]["oracle"] == s0["groups"]["all"]["oracle"]
    other = make_tiny_editor(seed=5)
    ev.run(other, step=3)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "reward": 0.1 * i, "reward/clip_sp": 0.1})
                                                    + "\n" for i in range(1, 4)))
    rep = write_report(tmp_path, eval_dir=tmp_path / "eval", start_step=0, final_step=3, seconds=1.0,
                       eval_manifest=str(toy_eval["eval"]))
    a, _ = load_eval(tmp_path / "eval" / "step-0")
    b = {r["id"]: r for r in load_eval(tmp_path / "eval" / "step-3")[0]}
    deltas = [b[r["id"]]["mean"]["oracle"] - r["mean"]["oracle"] for r in a]
    assert rep["delta_oracle"]["mean"] == pytest.approx(sum(deltas) / len(deltas))
    assert rep["delta_oracle"]["ci95"] == pytest.approx(list(bootstrap_ci(deltas, n=5000, seed=0)[1:]))
    assert rep["n_prompts"] == 5 and set(rep["sft"]) >= {"oracle", "if_error", "sp_error", "reward"}
    for name in ("report.json", "report.md", "report.html", "reward_curves.png"):
        assert (tmp_path / name).exists(), name
    html = (tmp_path / "report.html").read_text()
    assert html.count("<img src='report_media/") == 3 * 4  # source, target, SFT, GRPO for the 3 saved items
    # the sampler the numbers came from is recorded and shown; a GRPO evaluation with another one is flagged
    assert s0["sampler"] == {"method": "ode", "num_steps": 2, "guidance_scale": 2.0, "guidance_interval": None,
                             "shift": float(editor.config.shift)}
    assert rep["eval_sampler"] == s0["sampler"]
    assert "evaluation sampler: 2 ODE steps, shift 1, CFG 2 on every step" in html and "WARNING" not in html
    cfg.guidance_interval, cfg.shift = [0.5, 1.0], 6.0
    ev.run(other, step=3)
    write_report(tmp_path, eval_dir=tmp_path / "eval", start_step=0, final_step=3, seconds=1.0)
    md = (tmp_path / "report.md").read_text()
    assert "WARNING: the GRPO evaluation used another sampler (2 ODE steps, shift 6, CFG 2 where 0.5 < sigma <= 1)" in md


@pytest.mark.slow
def test_toy_chain_smoke(tmp_path, repo_root, monkeypatch):
    """Every stage of `recipe=recipes/toy.yaml`, shrunk: data, toy CLIP, SFT, eval, GRPO, eval, report."""
    from editgrpo.train import main

    monkeypatch.chdir(repo_root)
    # the recipe compiles its SFT stage's DiT and keeps Edit-GRPO eager; ``aot_eager`` runs dynamo's graphs without
    # inductor's C++ build (about a minute per chain here; inductor's kernels are tested in tests/test_sft.py)
    compiled = _spy_on_compile(monkeypatch, backend="aot_eager")
    cfg = load_recipe(GRPOConfig, [
        "recipe=recipes/toy.yaml", f"output_dir={tmp_path}", "report_to=none",
        "toy.n_sft_video=8", "toy.n_sft_image=4", "toy.n_grpo=4", "toy.n_eval_compound=2", "toy.n_eval_simple=1",
        "toy.reward_steps=10", "toy.instructor_steps=5", "toy.instructor_compound=8",
        "toy.sft_overrides=[train.max_steps=3,train.checkpoint_every=0]",
        "train.num_iterations=1", "train.prompts_per_iteration=2", "train.num_generations=2",
        "sampling.num_steps=4", "sampling.sde_window_size=2", "sampling.sde_window_range=[0,1]",
        "eval.num_steps=2", "eval.seeds=[1]", "eval.save_videos=2"])
    main(cfg)
    assert compiled == ["HunyuanVideoTransformer3DModel"]  # the SFT stage's, whatever Accelerator ran before it
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["n_prompts"] == 3 and "ci95" in report["delta_oracle"]
    assert {"sft", "grpo", "delta_oracle", "n_prompts", "seconds"} <= set(report)
    # the recipe logs the true accuracy of every rollout (toy_oracle, weight 0) next to the optimised rewards;
    # on the held-out prompts it equals the evaluator's oracle, computed from the target and mask files
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert {"reward/toy_oracle", "reward/pixel_sp", "reward/clip_if"} <= set(row)
    for stage in ("sft", "grpo"):
        assert report[stage]["reward/toy_oracle"] == pytest.approx(report[stage]["oracle"], abs=1e-6)
    assert (tmp_path / "sft" / "final" / "editor_config.json").exists()
    assert (tmp_path / "reward_model").is_dir() and (tmp_path / "lora").is_dir()
    # the SFT editor starts from the pretrained toy instructor and keeps it frozen (as VIVA keeps its LLaVA)
    from viva_base.training import load_editor

    pre, sft = load_editor(tmp_path / "instructor" / "editor"), load_editor(tmp_path / "sft" / "final")
    for a, b in ((pre.instructor, sft.instructor), (pre.text_encoder_2, sft.text_encoder_2)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert json.loads((tmp_path / "instructor" / "stage.json").read_text())["settings"]["steps"] == 5
    # the recipe's compositional options: the instructor also read text-only compound instructions, and the SFT
    # stage drops the pooled text vector for half of its samples (docs/toy_world.md, fourteenth pass)
    assert len((tmp_path / "instructor" / "compound_instructions.jsonl").read_text().splitlines()) == 8
    assert OmegaConf.load(tmp_path / "sft" / "config.yaml").train.pooled_dropout == 0.5
    # and half of the simple SFT instructions also name something to leave alone (fifteenth pass)
    assert json.loads((tmp_path / "data" / "world.json").read_text())["noop_clause"] == 0.5
    # the baselines and the diagnosis of the SFT editor are part of the report
    assert report["copy_source"]["sp_error"] == 0 and 0 < report["copy_source"]["oracle"] < 1
    assert set(report["if_progress"]) >= {"all", "simple", "compound"}
    diag = report["sft_diagnostics"]
    assert [r["sigma"] for r in diag["clean_latent"]["rows"]] == [0.95, 0.8, 0.5, 0.2, 0.05]
    assert {r["score"] for r in diag["group_spread"]["rows"]} >= {"oracle", "reward", "reward/pixel_sp"}
    page = (tmp_path / "report.html").read_text()
    assert "oracle source" in page and "The starting editor, diagnosed" in page and "within-group spread" in page
    # a rerun reuses every finished stage (no retraining of the SFT editor)
    mtime = (tmp_path / "sft" / "final" / "editor_config.json").stat().st_mtime_ns
    main(cfg)
    assert (tmp_path / "sft" / "final" / "editor_config.json").stat().st_mtime_ns == mtime
    assert len(compiled) == 1
    # same seed, same results: a second chain from scratch in another folder gives the same numbers and LoRA
    cfg2 = OmegaConf.merge(cfg, {"output_dir": str(tmp_path / "again")})
    main(cfg2)
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["sft"] == report["sft"] and again["grpo"] == report["grpo"]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "again" / "lora" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the SFT stage is cached by its recipe, not by its folder: 3 -> 4 steps continues the SFT run from its
    # checkpoint; the Edit-GRPO run (resume: latest) then refuses to continue on a different SFT editor
    from viva_base.errors import UserError

    longer = OmegaConf.merge(cfg, {"toy": {"sft_overrides": ["train.max_steps=4", "train.checkpoint_every=0"]}})
    with pytest.raises(UserError, match="toy.sft_fingerprint"):
        main(longer)
    assert json.loads((tmp_path / "sft" / "checkpoint-4" / "trainer_state.json").read_text())["step"] == 4
    assert json.loads((tmp_path / "sft" / "stage.json").read_text())["train.max_steps"] == 4


def test_saved_clips_cover_every_split_and_edit_type():
    """The report's examples: with compound prompts first in the manifest, the first 12 would all be compound."""
    from editgrpo.evaluate import showcase_indices

    recs = ([{"split": "compound", "novel_combo": i % 2 == 0, "edit_type": "compound"} for i in range(64)]
            + [{"split": "simple", "edit_type": t} for t in ("add", "remove", "recolour", "background", "replace") * 6])
    picked = showcase_indices(recs, 12)
    assert len(picked) == 12 == len(set(picked)) and picked == sorted(picked)
    kinds = [(recs[i]["split"], recs[i].get("novel_combo"), recs[i]["edit_type"]) for i in picked]
    assert {k[2] for k in kinds} == {"compound", "add", "remove", "recolour", "background", "replace"}
    assert {k[1] for k in kinds if k[0] == "compound"} == {True, False}
    assert showcase_indices(recs[:3], 12) == [0, 1, 2] and showcase_indices(recs, 0) == []


def test_evaluator_scores_open_instructions_against_their_nearest_correct_edit(tmp_path):
    """An edit that puts the object at another place than the example's target is exact for an open instruction
    ("add a red square", no place); before open edits the evaluator compared it with the one target file."""
    from editgrpo.report import copy_source_groups
    from viva_base.data.toyworld.edits import admissible_truths, op_from_json
    from viva_base.data.toyworld.scene import scene_from_json
    from viva_base.video import read_video

    paths = ensure_toy_dataset(tmp_path / "w", seed=4, n_sft_video=0, n_sft_image=0, n_grpo=0, n_eval_compound=0,
                               n_eval_simple=6, open_place=1.0, eval_simple_types=["add"])
    cfg = OmegaConf.structured(EvalConfig)
    cfg.manifest, cfg.seeds, cfg.batch_size, cfg.save_videos = str(paths["eval"]), [1], 4, 2
    ev = Evaluator(cfg, CombinedReward.from_config({"pixel_sp": {"weight": 1.0}}), tmp_path / "eval")
    assert all(r["open"] for r in ev.records)

    def other_place(policy, recs, seed, first_index):  # a perfect editor that never picks the example's place
        return torch.stack([admissible_truths(scene_from_json(r["scene"]), [op_from_json(o) for o in r["ops"]])[-1][0]
                            for r in recs])

    ev.edit = other_place
    from types import SimpleNamespace

    s = ev.run(SimpleNamespace(transformer=torch.nn.Linear(1, 1), config=SimpleNamespace(shift=1.0)), step=0)
    assert s["groups"]["all"]["oracle"] == pytest.approx(1.0) and s["groups"]["open/simple"]["n"] == 6
    assert s["groups"]["all"]["if_progress"] == pytest.approx(1.0)
    # the same videos against the example's target file alone fall short (what the evaluator computed before)
    from viva_base.data.toyworld.oracle import oracle_scores, read_mask

    rec = ev.records[0]
    edited = other_place(None, [rec], 1, 0)
    plain = oracle_scores(edited, read_video(rec["source"]).frames[None], read_video(rec["target"]).frames[None],
                          read_mask(rec["mask"])[None])
    assert float(plain["oracle"][0]) < 0.99
    # the report's "source (no edit)" row: the source scored against its nearest correct edit
    copy = copy_source_groups(paths["eval"])
    assert copy["open/simple"]["n"] == 6 and 0 < copy["all"]["oracle"] < 1 and copy["all"]["sp_error"] == 0
    # the report says that the target it shows is one correct edit among several
    ev.run(SimpleNamespace(transformer=torch.nn.Linear(1, 1), config=SimpleNamespace(shift=1.0)), step=1)
    write_report(tmp_path, eval_dir=tmp_path / "eval", start_step=0, final_step=1, seconds=1.0,
                 eval_manifest=str(paths["eval"]))
    assert (tmp_path / "report.html").read_text().count("open: the target shown is one of several correct edits") == 2


def test_item_groups_of_compound_prompts_by_their_operations():
    """A prompt of several operations also counts in ops/<n>/background or ops/<n>/objects; a single operation, or
    an item written before the evaluation recorded its operations, in neither."""
    from editgrpo.evaluate import item_groups

    base = {"split": "compound", "edit_type": "compound", "novel_combo": True}
    assert item_groups({**base, "operations": ["recolour", "add", "background"]}) == [
        "all", "split/compound", "split/compound-novel", "type/compound", "ops/3/background"]
    assert item_groups({**base, "operations": ["add", "remove"]})[-1] == "ops/2/objects"
    assert not any(g.startswith("ops/") for g in item_groups(base))
    simple = {"split": "simple", "edit_type": "background", "operations": ["background"]}
    assert item_groups(simple) == ["all", "split/simple", "type/background"]


def test_operation_regions_split_a_compound_edit_by_operation():
    from viva_base.data.toyworld.edits import Recolour, SetBackground, apply
    from viva_base.data.toyworld.oracle import operation_errors, operation_regions
    from viva_base.data.toyworld.render import changed_pixels, render, to_tensor
    from viva_base.data.toyworld.scene import Background, Obj, Scene

    objects = (Obj("square", "red", "small", 8.0, 8.0, 0.0, 0.0), Obj("circle", "blue", "large", 22.0, 22.0, 0.0, 0.0))
    scene = Scene(Background("plain", "grey", "day"), objects, 5, 32, 32, 1)
    ops = [Recolour(0, "green"), SetBackground(colour="mint")]
    r1, r2 = operation_regions(scene, ops)
    whole = torch.from_numpy(changed_pixels(render(scene), render(apply(scene, ops))))[:, None].float()
    assert r1.shape == (5, 1, 32, 32) and float((r1 * r2).sum()) == 0 and torch.equal(r1 + r2, whole)
    assert float(r1.sum()) < float(r2.sum())  # the square, then the background around both objects
    src, tgt = to_tensor(render(scene)), to_tensor(render(apply(scene, ops)))
    first = to_tensor(render(apply(scene, ops[:1])))
    e = operation_errors(first, src, tgt, [r1, r2])  # an edit that does the first operation only
    assert e["op1_error"] == 0 and e["op1_identity"] > 0 and e["op2_error"] == pytest.approx(e["op2_identity"])
    assert operation_errors(tgt, src, tgt, [r1, r2])["op2_error"] == 0


def test_evaluator_and_report_show_which_operations_of_a_compound_instruction_are_carried_out(tmp_path):
    """Per-operation progress, pooled over the compound prompts, against an independent numpy computation: an
    editor that does only the first-named operation of each instruction (what the toy SFT editor does)."""
    from types import SimpleNamespace

    import numpy as np

    from viva_base.data.toyworld.edits import apply, op_from_json
    from viva_base.data.toyworld.render import render, to_tensor
    from viva_base.data.toyworld.scene import scene_from_json

    paths = ensure_toy_dataset(tmp_path / "w", seed=6, n_sft_video=0, n_sft_image=0, n_grpo=0, n_eval_compound=6,
                               n_eval_simple=2, frames=5)
    cfg = OmegaConf.structured(EvalConfig)
    cfg.manifest, cfg.seeds, cfg.batch_size, cfg.save_videos = str(paths["eval"]), [1], 4, 2
    ev = Evaluator(cfg, CombinedReward.from_config({"pixel_sp": {"weight": 1.0}}), tmp_path / "eval")

    def states(r):
        scene, ops = scene_from_json(r["scene"]), [op_from_json(o) for o in r["ops"]]
        return [render(apply(scene, ops[:k])).astype(np.float64) / 255 for k in range(len(ops) + 1)]

    def first_op_only(policy, recs, seed, first_index):
        return torch.stack([to_tensor(render(apply(scene_from_json(r["scene"]), [op_from_json(r["ops"][0])])))
                            for r in recs])

    ev.edit = first_op_only
    policy = SimpleNamespace(transformer=torch.nn.Linear(1, 1), config=SimpleNamespace(shift=1.0))
    g = ev.run(policy, step=0)["groups"]
    errors = {1: [], 2: [], 3: []}
    for r in ev.records:
        if r["split"] != "compound":
            continue
        f = states(r)
        whole = np.any(f[0] != f[-1], axis=-1)
        for k in range(1, len(f)):
            region = np.any(f[k - 1] != f[k], axis=-1) & whole
            if region.any():
                errors[k].append((np.abs(f[1] - f[-1])[region].mean(), np.abs(f[0] - f[-1])[region].mean()))
    for k, pairs in errors.items():
        if pairs:
            want = 1 - np.mean([e for e, _ in pairs]) / np.mean([i for _, i in pairs])
            assert g["split/compound"][f"op{k}_progress"] == pytest.approx(want, abs=1e-6)
    assert g["split/compound"]["op1_progress"] > 0.9 and g["split/compound"]["op2_progress"] < 0.1
    assert "op1_progress" not in g["split/simple"]          # a simple edit has no operations to tell apart
    ev.edit = lambda policy, recs, seed, first_index: torch.stack([read_video(r["target"]).frames for r in recs])
    g = ev.run(policy, step=1)["groups"]
    assert all(g["split/compound"][f"op{k}_progress"] == pytest.approx(1.0) for k in (1, 2))
    rep = write_report(tmp_path, eval_dir=tmp_path / "eval", start_step=0, final_step=1, seconds=1.0,
                       eval_manifest=str(paths["eval"]))
    ops = rep["op_progress"]["compound"]
    assert ops["op1"]["grpo"] == pytest.approx(1.0) and ops["op2"]["sft"] < 0.1 and "simple" not in rep["op_progress"]
    for name in ("report.md", "report.html"):
        text = (tmp_path / name).read_text()
        assert "Which operations of a compound instruction are carried out" in text and "2nd op GRPO" in text


def test_evaluator_and_report_split_the_preservation_error_at_the_edit_boundary(toy_eval, tmp_path):
    """An editor that keeps every pixel but is off by 0.2 in each 4x4 token that holds edited pixels and by 0.05 in
    every other token: the evaluation reads 0.2 at the boundary and 0.05 in the interior, with the share of kept
    pixels at the boundary counted independently (numpy, token by token); the report shows the table."""
    from types import SimpleNamespace

    import numpy as np

    from viva_base.data.toyworld.oracle import read_mask

    cfg = OmegaConf.structured(EvalConfig)
    cfg.manifest, cfg.seeds, cfg.batch_size, cfg.save_videos = str(toy_eval["eval"]), [1], 4, 0
    ev = Evaluator(cfg, CombinedReward.from_config({"pixel_sp": {"weight": 1.0}}), tmp_path / "eval")

    def offsets(rec):
        m = read_mask(rec["mask"]).numpy()[:, 0] > 0.5            # (F, H, W)
        off, share_num = np.full(m.shape, 0.05), 0
        for f in range(m.shape[0]):
            for y in range(0, m.shape[1], 4):
                for x in range(0, m.shape[2], 4):
                    if m[f, y:y + 4, x:x + 4].any():
                        off[f, y:y + 4, x:x + 4] = 0.2
                        share_num += int((~m[f, y:y + 4, x:x + 4]).sum())
        return off, share_num / int((~m).sum()), share_num < int((~m).sum())

    want = {r["id"]: offsets(r)[1:] for r in ev.records}
    def shifted(src, off):  # |edited - source| = off everywhere, inside [0, 1]
        off = torch.as_tensor(off, dtype=torch.float32)[:, None]
        return torch.where(src > 0.5, src - off, src + off)

    ev.edit = lambda policy, recs, seed, first_index: torch.stack([
        shifted(read_video(r["source"]).frames, offsets(r)[0]) for r in recs])
    policy = SimpleNamespace(transformer=torch.nn.Linear(1, 1), config=SimpleNamespace(shift=1.0), spatial_ratio=4)
    ev.run(policy, step=0)
    ev.edit = lambda policy, recs, seed, first_index: torch.stack([read_video(r["target"]).frames for r in recs])
    ev.run(policy, step=1)
    rows, summary = load_eval(tmp_path / "eval" / "step-0")
    for r in rows:
        share, has_interior = want[r["id"]]
        assert r["mean"]["sp_boundary"] == pytest.approx(0.2) and r["mean"]["sp_boundary_share"] == pytest.approx(share)
        # a prompt whose kept pixels all sit in tokens with edits (a background edit) has no interior entry
        assert r["mean"].get("sp_interior") == (pytest.approx(0.05) if has_interior else None)
    assert any(has for _, has in want.values()) and any(not has for _, has in want.values())
    rep = write_report(tmp_path, eval_dir=tmp_path / "eval", start_step=0, final_step=1, seconds=1.0)
    sp = rep["preservation"]
    assert sp["all"]["sp_boundary"] == {"sft": pytest.approx(0.2), "grpo": pytest.approx(0.0)}
    assert sp["all"]["sp_boundary_share"]["sft"] == pytest.approx(sum(s for s, _ in want.values()) / len(want))
    assert {"split/simple", "split/compound"} <= set(sp)
    # compound prompts by number of operations and whether one edits the background, from the manifest's ops
    ops = {r["id"]: [op["op"] for op in r["ops"]] for r in ev.records}
    assert all(r["operations"] == ops[r["id"]] for r in rows)
    members: dict = {}
    for i, o in ops.items():
        if len(o) > 1:
            members.setdefault(f"ops/{len(o)}/{'background' if 'background' in o else 'objects'}", []).append(i)
    assert {g for g in sp if g.startswith("ops/")} == set(members) == {"ops/2/background", "ops/3/background"}
    for g, ids in members.items():
        assert sp[g]["sp_boundary_share"]["sft"] == pytest.approx(sum(want[i][0] for i in ids) / len(ids))
        assert summary["groups"][g]["n"] == len(ids)
    for name in ("report.md", "report.html"):
        text = (tmp_path / name).read_text()
        assert "Where the preservation error sits" in text and "at the boundary SFT" in text
        assert "| ops/3/background |" in text or "<td>ops/3/background</td>" in text


def _bare_evaluator(records: list[dict], batch_size: int, seeds: list[int]) -> Evaluator:
    """An Evaluator over in-memory ``records`` (no manifest read): what :meth:`Evaluator.batches` and ``share`` see."""
    ev = Evaluator.__new__(Evaluator)
    ev.cfg = OmegaConf.create({"batch_size": batch_size})
    ev.records, ev.seeds = records, seeds
    return ev


def test_evaluation_batches_never_mix_items_with_and_without_a_reference():
    """A batch mixing items with and without a reference image runs two DiT forwards a step
    (VivaEditor.velocity); batches split at every change, so each costs one forward a step."""
    refs = [None, None, "a.png", "b.png", "c.png", None, "d.png"]
    ev = _bare_evaluator([{"reference": r} for r in refs], batch_size=2, seeds=[5, 6])
    assert ev.batches() == [(0, 2), (2, 4), (4, 5), (5, 6), (6, 7)]
    assert ev.units()[:5] == [(5, 0, 2), (5, 2, 4), (5, 4, 5), (5, 5, 6), (5, 6, 7)] and len(ev.units()) == 10
    plain = _bare_evaluator([{} for _ in range(5)], batch_size=2, seeds=[1])
    assert plain.batches() == [(0, 2), (2, 4), (4, 5)] and _bare_evaluator([], 2, [1]).units() == []


@pytest.mark.parametrize("n_units, world", [(3, 2), (5, 4), (1, 3), (6, 3)])
def test_zero3_evaluation_runs_as_many_batches_on_every_process(n_units, world):
    """Under ZeRO-3 (``lockstep``) every process runs ceil(units / processes) batches, so their DiT forwards stay
    in step; the real ones are each unit once over all processes, the rest repeats of one of its own (dropped)."""
    ev = _bare_evaluator([{} for _ in range(n_units)], batch_size=1, seeds=[0])
    shares = [ev.share(r, world, lockstep=True) for r in range(world)]
    assert {len(mine) for mine, _ in shares} == {-(-n_units // world)}
    real = [u for mine, n in shares for u in mine[:n]]
    assert sorted(real) == ev.units()
    for mine, n in shares:
        assert all(u in (mine[:n] or ev.units()[:1]) for u in mine[n:])
    assert [ev.share(r, world) for r in range(world)] == [(ev.units()[r::world], len(ev.units()[r::world]))
                                                          for r in range(world)]  # DDP: no padding


def test_the_evaluator_keeps_source_clips_as_uint8_and_gives_back_the_decoded_frames(toy_eval, tmp_path):
    """Kept between evaluations, a real-size source (33 x 480 x 848) held as float32 cost 161 MB per item on every
    process; as uint8 a quarter, and the frames handed to the editor are exactly the decoder's."""
    cfg = OmegaConf.structured(EvalConfig)
    cfg.manifest = str(toy_eval["eval"])
    ev = Evaluator(cfg, CombinedReward.from_config({"pixel_sp": {"weight": 1.0}}), tmp_path / "eval")
    for rec in ev.records:
        frames = ev._load(rec)["source"]
        assert ev._videos[rec["id"]]["source"].dtype == torch.uint8
        assert frames.dtype == torch.float32 and torch.equal(frames, read_video(rec["source"]).frames)
