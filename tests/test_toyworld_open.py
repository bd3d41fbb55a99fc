"""Open toy edits: an instruction that leaves the place of an added object open has several correct edits, and the
oracle scores an edit against the best of them (docs/toy_world.md, "Open edits")."""
import json

import pytest
import torch

from rewards import build_reward
from viva_base.data.toy import ensure_toy_dataset
from viva_base.data.toyworld.build import build_toy_dataset
from viva_base.data.toyworld.edits import (PLACE_PHRASES, PLACES, Add, admissible_ops, admissible_truths, apply,
                                           edit_parse, instruction, is_open, op_from_json, op_to_json, parse_slots)
from viva_base.data.toyworld.oracle import best_oracle_scores, oracle_scores, record_truths
from viva_base.data.toyworld.pairs import example_rng, sample_example
from viva_base.data.toyworld.render import render_tensor
from viva_base.errors import UserError


def _open_add_example(index=3):
    ex = sample_example(example_rng(0, "sft_video", index), ["add"], open_place=1.0)
    assert is_open(ex.ops)
    return ex


def test_an_open_add_names_no_place_and_every_place_is_a_correct_edit():
    ex = _open_add_example()
    op = ex.ops[0]
    assert op.free == ("where",) and op.where in PLACES
    assert not any(phrase in ex.instruction for phrase in PLACE_PHRASES.values())
    assert op_from_json(json.loads(json.dumps(op_to_json(op)))) == op
    alts = admissible_ops(ex.source, ex.ops)
    assert tuple(ex.ops) in alts and len(alts) == len(PLACES)
    assert sorted(a[0].where for a in alts) == sorted(PLACES)
    renders = {render_tensor(apply(ex.source, a)).numpy().tobytes() for a in alts}
    assert len(renders) == len(PLACES)  # nine different target videos
    # same object and motion, only the place differs
    assert {(a[0].obj.shape, a[0].obj.colour, a[0].obj.size, a[0].obj.vx, a[0].obj.vy, a[0].motion) for a in alts} == \
        {(op.obj.shape, op.obj.colour, op.obj.size, op.obj.vx, op.obj.vy, op.motion)}
    # the instruction's parse (what the toy instructor learns) sets no place
    start = 0
    for name, values in parse_slots():
        if name == "place":
            assert edit_parse(ex.ops, ex.source)[start:start + len(values)].sum() == 0
        start += len(values)
    # a named place stays named
    named = Add.place(op.obj.shape, op.obj.colour, op.obj.size, "top left", op.motion, 32, 32)
    assert admissible_ops(ex.source, [named]) == [(named,)]
    assert PLACE_PHRASES["top left"] in instruction(ex.source, [named], example_rng(0, "fresh", 0))


def test_an_open_place_needs_a_place_and_only_where_can_be_open():
    ex = _open_add_example()
    with pytest.raises(ValueError, match="only"):
        Add(ex.ops[0].obj, "top", "still", ("colour",))
    with pytest.raises(ValueError, match="needs the example's place"):
        Add(ex.ops[0].obj, None, "still", ("where",))


def test_best_oracle_scores_take_the_nearest_correct_edit():
    ex = _open_add_example()
    truths = admissible_truths(ex.source, ex.ops)
    src = render_tensor(ex.source)
    assert torch.equal(truths[0][0], render_tensor(ex.target))  # the example's own target first
    # every correct edit scores exactly 1 and is recognised as that alternative
    edited = torch.stack([t for t, _ in truths])
    got = best_oracle_scores(edited, src[None].expand_as(edited), [truths] * len(truths))
    assert torch.equal(got["oracle"], torch.ones(len(truths), dtype=torch.float64))
    assert got["alternative"].tolist() == list(range(len(truths)))
    # against the single example target, the other places score < 1 (what the oracle said before open edits)
    single = oracle_scores(edited, src[None].expand_as(edited), truths[0][0][None].expand_as(edited),
                           truths[0][1][None].expand(len(truths), *truths[0][1].shape))["oracle"]
    assert single[0] == 1 and (single[1:] < 0.99).all()
    # an independent reference: the max over the alternatives of the plain oracle, for a noisy edit and the source
    torch.manual_seed(0)
    noisy = (truths[4][0] + 0.2 * torch.randn_like(truths[4][0])).clamp(0, 1)
    for video in (noisy, src):
        per = [float(oracle_scores(video[None], src[None], t[None], m[None])["oracle"][0]) for t, m in truths]
        best = best_oracle_scores(video[None], src[None], [truths])
        assert float(best["oracle"][0]) == pytest.approx(max(per), abs=1e-12)
        assert int(best["alternative"][0]) == per.index(max(per))
    # one alternative: exactly the plain oracle
    one = best_oracle_scores(noisy[None], src[None], [truths[:1]])
    plain = oracle_scores(noisy[None], src[None], truths[0][0][None], truths[0][1][None])
    assert all(torch.equal(one[k], plain[k]) for k in plain)


@pytest.fixture(scope="module")
def open_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("open_world")
    paths = build_toy_dataset(out, seed=3, n_sft_video=8, n_sft_image=4, n_grpo=6, n_eval_compound=2, n_eval_simple=8,
                              open_place=0.5, grpo_types=["add"], eval_simple_types=["add", "remove"])
    return out, paths


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_builder_marks_open_prompts_and_types_the_grpo_and_eval_prompts(open_world):
    out, paths = open_world
    grpo, ev = _records(paths["grpo"]), _records(paths["eval"])
    assert all(r["edit_type"] == "add" for r in grpo)
    assert [r["edit_type"] for r in ev if r["split"] == "simple"] == ["add", "remove"] * 4
    every = grpo + ev + _records(paths["sft"])
    assert all(r["open"] == any(o.get("free") for o in r["ops"]) for r in every)
    assert any(r["open"] for r in every) and not all(r["open"] for r in every if r["edit_type"] == "add")
    assert not any(r["open"] for r in every if "add" not in json.dumps(r["ops"]))
    world = json.loads(paths["world"].read_text())
    assert world["open_place"] == 0.5 and world["grpo_types"] == ["add"]
    # the eval record's target file is its first correct edit
    rec = next(r for r in ev if r["open"])
    from viva_base.video import read_video

    truths = record_truths({**rec, "target": str(out / rec["target"]), "mask": str(out / rec["mask"])})
    assert len(truths) == len(PLACES)
    assert torch.equal(truths[0][0], read_video(out / rec["target"]).frames)


def test_toy_oracle_reward_scores_any_correct_place_as_exact(open_world):
    """Failed before open edits: the reward compared every sample with the one target of the manifest."""
    out, paths = open_world
    rec = next(r for r in _records(paths["eval"]) if r["open"])
    from viva_base.data.toyworld.scene import scene_from_json

    scene, ops = scene_from_json(rec["scene"]), [op_from_json(o) for o in rec["ops"]]
    truths = admissible_truths(scene, ops)
    edited = torch.stack([truths[1][0], truths[-1][0], render_tensor(scene)])
    src = render_tensor(scene)[None].expand_as(edited)
    r = build_reward("toy_oracle", manifest=str(paths["eval"]))
    got = r(edited, src, source_captions=[rec["source_caption"]] * 3, target_captions=[rec["target_caption"]] * 3,
            instructions=[rec["instruction"]] * 3).scores
    assert got[0] == 1 and got[1] == 1 and got[2] < 1


def test_open_place_zero_builds_what_the_builder_built_before(tmp_path):
    """No record carries ``free``/``open`` and every add names its place (the manifests are byte-identical to a
    build by the code before open edits existed: checked once by hand, see the commit)."""
    paths = build_toy_dataset(tmp_path / "w", seed=1, n_sft_video=8, n_sft_image=8, n_grpo=4, n_eval_compound=4,
                              n_eval_simple=5)
    for name in ("sft", "grpo", "eval"):
        text = paths[name].read_text()
        assert '"free"' not in text and '"open"' not in text
        for r in _records(paths[name]):
            for o in r["ops"]:
                if o["op"] == "add":
                    assert any(p in r["instruction"] for p in PLACE_PHRASES.values())


def test_a_cached_world_is_rebuilt_when_open_place_changes(tmp_path):
    """Failed before: a world cached without the parameter counted as the same world for any value of it."""
    kw = dict(seed=2, n_sft_video=4, n_sft_image=2, n_grpo=2, n_eval_compound=2, n_eval_simple=5)
    ensure_toy_dataset(tmp_path / "w", **kw)
    world = json.loads((tmp_path / "w" / "world.json").read_text())
    for key in ("open_place", "grpo_types", "eval_simple_types"):  # a world written before these parameters
        world.pop(key)
    (tmp_path / "w" / "world.json").write_text(json.dumps(world))
    before = (tmp_path / "w" / "eval.jsonl").stat().st_mtime_ns
    ensure_toy_dataset(tmp_path / "w", **kw)  # the defaults: reused
    assert (tmp_path / "w" / "eval.jsonl").stat().st_mtime_ns == before
    paths = ensure_toy_dataset(tmp_path / "w", **kw, open_place=1.0)
    assert json.loads(paths["world"].read_text())["open_place"] == 1.0
    assert any(r.get("open") for r in _records(paths["eval"]))


def test_bad_open_edit_parameters_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="open_place"):
        build_toy_dataset(tmp_path / "a", open_place=1.5)
    with pytest.raises(UserError, match="grpo_types"):
        build_toy_dataset(tmp_path / "b", grpo_types=["paint"])


def test_an_open_add_off_the_named_grid_is_still_among_its_correct_edits():
    import dataclasses

    ex = _open_add_example()
    op = ex.ops[0]
    off = dataclasses.replace(op, obj=dataclasses.replace(op.obj, x=op.obj.x + 1.0))  # a hand-made position
    alts = admissible_ops(ex.source, [off])
    assert alts[0] == (off,) and len(alts) == len(PLACES) + 1
    truths = admissible_truths(ex.source, [off])
    assert torch.equal(truths[0][0], render_tensor(apply(ex.source, [off])))
