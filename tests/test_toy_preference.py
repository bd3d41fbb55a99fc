"""The toy preference reward model (editgrpo.toy_preference): pairs, loss, ranking metrics, collection of the
editor's groups, PickScore-style fine-tuning that learns a preference and is scored by the `pickscore` reward."""
import json
import math

import pytest
import torch

from editgrpo import toy_preference as tp
from editgrpo.toy_reward import train_toy_clip
from rewards.registry import build_reward
from viva_base.data.manifest import read_manifest
from viva_base.data.toy import ensure_toy_dataset
from viva_base.data.toyworld.oracle import best_oracle_scores
from viva_base.tiny import make_tiny_editor


def test_preference_pairs_are_every_within_group_pair_beyond_the_margin():
    s = torch.tensor([[0.3, 0.1, 0.2], [0.5, 0.5, 0.9]])
    n, i, j, p = tp.preference_pairs(s)
    got = sorted(zip(n.tolist(), i.tolist(), j.tolist(), p.tolist()))
    # group 1's samples 0 and 1 tie exactly: no preference, dropped
    assert got == [(0, 0, 1, 1.0), (0, 0, 2, 1.0), (0, 1, 2, 0.0), (1, 0, 2, 0.0), (1, 1, 2, 0.0)]
    n, i, j, p = tp.preference_pairs(s, margin=0.15)
    assert sorted(zip(n.tolist(), i.tolist(), j.tolist())) == [(0, 0, 1), (1, 0, 2), (1, 1, 2)]
    with pytest.raises(ValueError, match="groups, samples"):
        tp.preference_pairs(torch.zeros(4))


def test_a_noisy_annotator_prefers_with_the_bradley_terry_probability():
    d = torch.tensor([0.0, 0.01, -0.02, 0.05])
    s = torch.stack([d, torch.zeros_like(d)], 1).repeat(20000, 1)  # 20000 annotations of each pair
    n, i, j, p = tp.preference_pairs(s, temperature=0.01, generator=torch.Generator().manual_seed(0))
    by_diff = p.view(20000, 3).mean(0)  # the exact tie (d = 0) is dropped
    want = torch.sigmoid(d[1:] / 0.01)  # 0.731, 0.119, 0.993
    assert torch.allclose(by_diff, want, atol=0.01)


def test_bradley_terry_loss_is_the_two_way_softmax_cross_entropy():
    g = torch.Generator().manual_seed(1)
    ri, rj, p = torch.randn(7, generator=g), torch.randn(7, generator=g), torch.rand(7, generator=g)
    logits = torch.stack([ri, rj], 1)
    want = -(torch.stack([p, 1 - p], 1) * logits.log_softmax(1)).sum(1).mean()
    assert tp.bradley_terry_loss(ri, rj, p).item() == pytest.approx(want.item(), rel=1e-6)
    # a confident right ranking costs ~0, a confident wrong one ~ its margin
    assert tp.bradley_terry_loss(torch.tensor([20.0]), torch.tensor([0.0]), torch.tensor([1.0])).item() < 1e-8
    assert tp.bradley_terry_loss(torch.tensor([0.0]), torch.tensor([20.0]), torch.tensor([1.0])).item() == \
        pytest.approx(20.0, rel=1e-6)


def test_ranking_metrics_against_hand_values():
    truth = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    pred = torch.tensor([[10.0, 20.0, 30.0, 40.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    # the constant third group ranks nothing and is left out: (1 + -1) / 2
    assert tp.within_group_spearman(pred, truth) == pytest.approx(0.0)
    assert tp.within_group_spearman(pred[:1], truth[:1]) == pytest.approx(1.0)
    assert math.isnan(tp.within_group_spearman(pred[2:], truth[2:]))
    # 6 pairs right in group 0, 0 of 6 in group 1, group 2 has no pairs; a tie in pred counts half
    assert tp.pairwise_accuracy(pred, truth) == pytest.approx(0.5)
    tied = torch.tensor([[1.0, 1.0, 3.0, 4.0]])
    assert tp.pairwise_accuracy(tied, truth[:1]) == pytest.approx(5.5 / 6)


# ------------------------------------------------------------------------------------------------
# Collection from an editor
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return ensure_toy_dataset(root, seed=7, n_sft_video=2, n_sft_image=0, n_grpo=3, n_eval_compound=1,
                              n_eval_simple=2, frames=5, size=32, open_place=0.5)


def test_collect_scores_every_sample_with_the_oracle_and_round_trips(toy, tmp_path, one_thread):
    editor = make_tiny_editor()
    for manifest, kind in ((toy["grpo"], "prompts"), (toy["eval"], "eval")):  # GRPO prompts: truths from the scene
        recs = read_manifest(manifest, kind)
        got = tp.collect_samples(editor, recs, group_size=3, num_steps=2, prompts_per_batch=2, progress=False)
        n = len(recs)
        assert got["videos"].shape == (n, 3, 5, 3, 32, 32) and got["videos"].dtype == torch.uint8
        assert got["sources"].shape == (n, 5, 3, 32, 32) and got["oracle"].shape == (n, 3)
        assert got["ids"] == [r["id"] for r in recs]
        # an independent recomputation from the stored 8-bit videos and every correct edit of each prompt
        for k, rec in enumerate(recs):
            truths = tp._truths(rec, {})
            e = got["videos"][k].float() / 255
            o = best_oracle_scores(e, got["sources"][k].float().div(255).expand_as(e), [truths] * 3)
            assert torch.allclose(o["oracle"].float(), got["oracle"][k], atol=1e-6)
        assert float(got["oracle"].std(dim=1).max()) > 1e-4  # a random editor's samples differ
    path = tmp_path / "s.safetensors"
    tp.save_samples(got, path, meta={"why": "test"})
    back = tp.load_samples(path)
    assert all(torch.equal(back[k], got[k]) for k in ("videos", "sources", "oracle", "if_error", "sp_error"))
    assert all(back[k] == got[k] for k in tp.TEXT_KEYS) and back["meta"] == {"why": "test"}
    with pytest.raises(ValueError, match="neither a scene"):
        tp.collect_samples(editor, [{"id": "x", "instruction": "add", "source": "nope.mkv"}], progress=False)


# ------------------------------------------------------------------------------------------------
# Fine-tuning learns a preference the initial model does not know
# ------------------------------------------------------------------------------------------------
CAPTIONS = ["a small red circle on a plain white background", "a large blue square on a mint gradient background"]


def _synthetic(groups: int, seed: int, g_size: int = 4, frames: int = 2) -> dict:
    """Groups of one shared random background each, whose samples differ only in the brightness of a central square.
    The annotator prefers brighter squares under the first caption and darker ones under the second: a preference
    that depends on the text, which no fixed image feature ranks (the initial CLIP's order is right for one caption
    and reversed for the other) and only the pairs teach."""
    g = torch.Generator().manual_seed(seed)
    bg = torch.rand(groups, 1, 1, 3, 32, 32, generator=g) * 0.5
    level = torch.rand(groups, g_size, generator=g)
    videos = bg.expand(groups, g_size, frames, 3, 32, 32).clone()
    videos[..., 10:22, 10:22] = level[:, :, None, None, None, None]
    which = torch.arange(groups) % 2
    oracle = torch.where(which[:, None] == 0, level, 1 - level)
    return {"videos": (videos * 255).round().to(torch.uint8), "sources": (bg[:, 0].expand(groups, frames, 3, 32, 32)
            * 255).round().to(torch.uint8), "oracle": oracle, "if_error": -oracle, "sp_error": torch.zeros_like(level),
            "ids": [f"g{k}" for k in range(groups)], "instructions": ["x"] * groups,
            "source_captions": [""] * groups, "target_captions": [CAPTIONS[k] for k in which.tolist()]}


@pytest.fixture(scope="module")
def init_clip(tmp_path_factory, one_thread):
    return train_toy_clip(tmp_path_factory.mktemp("clip") / "m", steps=2, batch_size=8, width=32, embed_dim=32,
                          layers=1, progress=False)


def test_fine_tuning_learns_the_annotators_preference_and_the_pickscore_reward_reads_it(init_clip, tmp_path):
    train, held = _synthetic(48, seed=0), _synthetic(16, seed=1)
    before = tp.evaluate_rankers(held, {"init": build_reward("pickscore", model=init_clip)})[0]
    name = tp.train_preference_model(init_clip, [train], tmp_path / "pref", steps=120, pairs_per_step=16, lr=1e-3,
                                     progress=False)
    meta = json.loads((tmp_path / "pref" / tp.META_FILE).read_text())
    assert meta["params"]["pairs"] == 48 * 6 and meta["stats"]["final_loss"] < meta["stats"]["first_loss"]
    after = tp.evaluate_rankers(held, {"pref": build_reward("pickscore", model=name)})[0]
    assert abs(before["spearman_oracle"]) < 0.3, before  # the initial CLIP's order is right for one caption only
    assert after["spearman_oracle"] > 0.9 and after["pair_accuracy"] > 0.9, (before, after)
    # the saved model scores exactly what training optimised: eq. 6 of the pickscore reward
    from rewards.clip import load_clip, parse_clip_spec

    clip = load_clip(parse_clip_spec(name), device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        own = tp._score_fn(clip.model, clip.preprocess, clip.tokenizer)(held["videos"][0].float() / 255,
                                                                        [held["target_captions"][0]] * 4)
    r = build_reward("pickscore", model=name)(held["videos"][0].float() / 255, held["sources"][0:1].expand(4, -1, -1, -1, -1).float() / 255,
                                              source_captions=[""] * 4, target_captions=[held["target_captions"][0]] * 4,
                                              instructions=["x"] * 4, references=[None] * 4)
    assert torch.allclose(own, r.scores, atol=1e-4)
    # deterministic: the same inputs give the same weights
    again = tp.train_preference_model(init_clip, [train], tmp_path / "pref2", steps=120, pairs_per_step=16, lr=1e-3,
                                      progress=False)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "pref" / "open_clip_model.safetensors"))
    b = load_file(str(tp._local_dir(again) / "open_clip_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_runs_the_three_steps_and_reports_user_errors(toy, init_clip, tmp_path, capsys, one_thread):
    ed = tmp_path / "ed"
    make_tiny_editor().save_pretrained(ed)
    data = tmp_path / "d.safetensors"
    assert tp.main(["collect", "--model", str(ed), "--manifest", str(toy["grpo"]), "--out", str(data),
                    "--group-size", "3", "--num-steps", "2"]) == 0
    assert tp.main(["train", "--init", init_clip, "--data", str(data), "--out", str(tmp_path / "m"),
                    "--steps", "3", "--pairs-per-step", "4"]) == 0
    assert "rewards.pickscore.model=open_clip:local-dir:" in capsys.readouterr().out
    assert tp.main(["evaluate", "--data", str(data), "--model", str(tmp_path / "m"),
                    "--proxies", tp._local_dir(init_clip).as_posix()]) == 0
    out = capsys.readouterr().out
    assert "| clip_if |" in out and "pickscore (" in out and "recipe total" in out
    # user errors: one line, exit 2
    assert tp.main(["train", "--init", str(tmp_path / "none"), "--data", str(data), "--out", str(tmp_path / "x")]) == 2
    assert tp.main(["train", "--init", init_clip, "--data", str(tmp_path / "none.safetensors"),
                    "--out", str(tmp_path / "x")]) == 2
    assert tp.main(["collect", "--model", str(ed), "--manifest", str(tmp_path / "none.jsonl"), "--out", str(data),
                    "--group-size", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert not (tmp_path / "x").exists()
    # an --out that cannot be written: one line before the work (a traceback after it before)
    assert tp.main(["collect", "--model", str(ed), "--manifest", str(toy["grpo"]), "--out", "/proc/no/d.st",
                    "--group-size", "3", "--num-steps", "2"]) == 2
    assert tp.main(["train", "--init", init_clip, "--data", str(data), "--out", str(data / "m"), "--steps", "3"]) == 2
    assert tp.main(["evaluate", "--data", str(data), "--proxies", tp._local_dir(init_clip).as_posix(),
                    "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --out /proc/no/d.st: cannot create folders in /proc (No such file or directory); give a writable "
        "folder",
        f"error: --out {data / 'm'}: {data} is a file, so no folder can be made under it; give another folder",
        f"error: --out {tmp_path}: that is a folder; give a file name"]


def test_pickscore_can_score_against_the_instruction(init_clip):
    v = _synthetic(2, seed=3)["videos"][0].float() / 255  # (4, F, 3, H, W)
    kw = dict(source_captions=[""] * 4, references=[None] * 4)
    by_caption = build_reward("pickscore", model=init_clip)(v, v, target_captions=[CAPTIONS[0]] * 4,
                                                             instructions=[CAPTIONS[1]] * 4, **kw).scores
    by_instruction = build_reward("pickscore", model=init_clip, text="instruction")(
        v, v, target_captions=[CAPTIONS[1]] * 4, instructions=[CAPTIONS[0]] * 4, **kw).scores
    assert torch.equal(by_caption, by_instruction)  # the texts swapped places: the same scores
    other = build_reward("pickscore", model=init_clip, text="instruction")(
        v, v, target_captions=[CAPTIONS[0]] * 4, instructions=[CAPTIONS[1]] * 4, **kw).scores
    assert not torch.allclose(other, by_caption)
    with pytest.raises(ValueError, match="text must be one of"):
        build_reward("pickscore", model=init_clip, text="caption")
    with pytest.raises(ValueError, match="hflip"):
        tp.train_preference_model(init_clip, [_synthetic(2, 0)], "unused", hflip=True, text="instruction")


def test_training_refuses_a_folder_that_is_not_a_preference_model_before_any_work(init_clip, tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="does not hold a toy preference model"):
        tp.train_preference_model(init_clip, [_synthetic(4, 0)], other, steps=1, progress=False)
    assert (other / "notes.txt").read_text() == "keep me"
    # an earlier preference model is replaced
    tp.train_preference_model(init_clip, [_synthetic(4, 0)], tmp_path / "m", steps=1, progress=False)
    tp.train_preference_model(init_clip, [_synthetic(4, 0)], tmp_path / "m", steps=2, progress=False)
    assert json.loads((tmp_path / "m" / tp.META_FILE).read_text())["params"]["steps"] == 2


def test_a_source_aware_direction_model_learns_the_preference_and_clip_dir_reads_it(init_clip, tmp_path):
    """``score="direction"``: trained on the change from source to sample against the change of captions; the saved
    model is read by the ``clip_dir`` reward (what ``reward_of`` names), which scores exactly what training optimised
    up to the learned scale."""
    train, held = _synthetic(48, seed=0), _synthetic(16, seed=1)
    name = tp.train_preference_model(init_clip, [train], tmp_path / "dir", steps=120, pairs_per_step=16, lr=1e-3,
                                     score="direction", progress=False)
    reward, kwargs = tp.reward_of(tmp_path / "dir")
    assert (reward, kwargs["text"]) == ("clip_dir", "captions") and kwargs["model"] == name
    assert tp.reward_of(init_clip)[0] == "pickscore"  # a plain toy CLIP: eq. 6 against target captions
    after = tp.evaluate_rankers(held, {"dir": build_reward(reward, **kwargs)})[0]
    assert after["spearman_oracle"] > 0.9 and after["pair_accuracy"] > 0.9, after
    from rewards.clip import load_clip, parse_clip_spec

    clip = load_clip(parse_clip_spec(name), device=torch.device("cpu"), dtype=torch.float32)
    v, src = held["videos"][0].float() / 255, held["sources"][0:1].float() / 255
    texts = dict(target_captions=[held["target_captions"][0]] * 4, source_captions=[held["source_captions"][0]] * 4)
    with torch.no_grad():
        own = tp._score_fn(clip.model, clip.preprocess, clip.tokenizer, "direction")(
            v, texts["target_captions"], src, texts["source_captions"][:1])  # one source, its caption
    r = build_reward(reward, **kwargs)(v, src.expand(4, -1, -1, -1, -1), instructions=["x"] * 4,
                                       references=[None] * 4, **texts)
    assert torch.allclose(own, clip.logit_scale * r.scores, atol=1e-4)
    with pytest.raises(ValueError, match="score must be one of"):
        tp.train_preference_model(init_clip, [train], "unused", score="rank")


def test_clip_dir_against_the_instruction_is_the_cosine_of_the_change_with_its_embedding(init_clip):
    from rewards.clip import load_clip, parse_clip_spec

    d = _synthetic(2, seed=5)
    v, src = d["videos"][0].float() / 255, d["sources"][0:1].expand(4, -1, -1, -1, -1).float() / 255
    got = build_reward("clip_dir", model=init_clip, text="instruction")(
        v, src, source_captions=["s"] * 4, target_captions=["t"] * 4, instructions=[CAPTIONS[0]] * 4,
        references=[None] * 4).scores
    clip = load_clip(parse_clip_spec(init_clip), device=torch.device("cpu"), dtype=torch.float32)
    e = clip.encode_images(v.reshape(-1, 3, 32, 32)).view(4, 2, -1)
    s = clip.encode_images(src.reshape(-1, 3, 32, 32)).view(4, 2, -1)
    t = clip.encode_texts([CAPTIONS[0]])[0]
    want = torch.nn.functional.cosine_similarity(e - s, t.expand_as(e), dim=-1).mean(1)  # independent of the code
    assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="text must be one of"):
        build_reward("clip_dir", model=init_clip, text="target_caption")


def test_rankers_are_also_scored_against_preservation():
    """``spearman_sp``: within-group Spearman with ``-sp_error``. pixel_sp is 1 - mean |edit - source|: with sp_error
    set to exactly that distance it orders every group as -sp_error does (+1), and as the oracle does not."""
    d = _synthetic(6, seed=2)
    v, s = d["videos"].float() / 255, d["sources"][:, None].float() / 255
    d["sp_error"] = (v - s).abs().mean(dim=(2, 3, 4, 5))
    (row,) = tp.evaluate_rankers(d, {"pixel_sp": build_reward("pixel_sp")})
    assert row["spearman_sp"] == pytest.approx(1.0)
    assert row["spearman_oracle"] < 0.5  # half the groups prefer the brighter (farther) squares
