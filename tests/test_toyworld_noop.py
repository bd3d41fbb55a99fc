"""No-op clauses in SFT instructions (``noop_clause`` / ``toy.sft_noop_clause``): a simple pair's instruction gets a
phrase that asks for nothing before or after its edit; the edit, target and mask stay those of the pair."""
import json

import numpy as np
import pytest

from viva_base.data.toy import ensure_toy_dataset
from viva_base.data.toyworld.build import build_toy_dataset
from viva_base.data.toyworld.edits import (BACKGROUND_NOOP_TEMPLATES, NOOP_TEMPLATES, PLACES, Add, Recolour, Remove,
                                           SetBackground, apply, noop_phrase, op_from_json, pad_with_noop)
from viva_base.data.toyworld.render import changed_pixels, render
from viva_base.data.toyworld.scene import Background, Obj, Scene, scene_from_json
from viva_base.errors import UserError

KW = dict(seed=4, n_sft_video=10, n_sft_image=10, n_grpo=4, n_eval_compound=2, n_eval_simple=5, frames=5)


def _scene():
    objs = (Obj("square", "red", "small", 8.0, 8.0, 0.0, 0.0), Obj("circle", "blue", "large", 20.0, 20.0, 0.0, 0.0))
    return Scene(Background("plain", "grey", "day"), objs, 9, 32, 32, 1)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _is_noop(phrase: str) -> bool:
    if phrase in BACKGROUND_NOOP_TEMPLATES:
        return True
    return any(phrase.startswith(t.split("{ref}")[0]) and phrase.endswith(t.split("{ref}")[1]) for t in NOOP_TEMPLATES)


def test_a_noop_phrase_names_only_what_no_operation_touches():
    scene = _scene()
    got = {noop_phrase(scene, [Recolour(0, "green")], np.random.default_rng(i)) for i in range(200)}
    assert all(_is_noop(p) for p in got)
    assert not any("square" in p for p in got)                     # the recoloured object is never "kept"
    assert any("blue circle" in p for p in got) and any(p in BACKGROUND_NOOP_TEMPLATES for p in got)
    got = {noop_phrase(scene, [SetBackground(colour="mint")], np.random.default_rng(i)) for i in range(200)}
    assert not got & set(BACKGROUND_NOOP_TEMPLATES) and any("red square" in p for p in got)
    # an object that an added one covers is not kept either, though no operation names it
    fx, fy = PLACES["top left"]
    covered = Scene(scene.background, (Obj("square", "red", "small", fx * 32, fy * 32, 0.0, 0.0), scene.objects[1]),
                    9, 32, 32, 1)
    add = Add.place("circle", "green", "large", "top left", "still", 32, 32)
    got = {noop_phrase(covered, [add], np.random.default_rng(i)) for i in range(200)}
    assert not any("square" in p for p in got) and any("blue circle" in p for p in got)
    # everything edited: nothing to keep, and the instruction stays as it was
    ops = [Recolour(1, "green"), Remove(0), SetBackground(colour="mint")]
    assert noop_phrase(scene, ops, np.random.default_rng(0)) is None
    assert pad_with_noop("x", scene, ops, np.random.default_rng(0)) == "x"


def test_a_given_changed_pixel_map_gives_the_phrase_rendering_would():
    """The builder passes the source/target renders' changed pixels it already has: same phrase, no second render."""
    scene = _scene()
    for ops in ([Recolour(0, "green")], [SetBackground(colour="mint")], [Remove(1)],
                [Add.place("circle", "green", "large", "top left", "still", 32, 32)]):
        changed = changed_pixels(render(scene), render(apply(scene, ops)))
        for i in range(20):
            assert noop_phrase(scene, ops, np.random.default_rng(i), changed) == noop_phrase(scene, ops,
                                                                                             np.random.default_rng(i))
            assert pad_with_noop("x", scene, ops, np.random.default_rng(i), changed) == pad_with_noop(
                "x", scene, ops, np.random.default_rng(i))
    # the map is what decides: a map that marks every pixel changed leaves only the background to keep
    everything = np.ones_like(changed_pixels(render(scene), render(scene)))
    got = {noop_phrase(scene, [Recolour(0, "green")], np.random.default_rng(i), everything) for i in range(50)}
    assert got <= set(BACKGROUND_NOOP_TEMPLATES)


def test_padding_keeps_the_edit_and_puts_the_phrase_before_or_after_it():
    scene, text = _scene(), "paint the red square green"
    padded = [pad_with_noop(text, scene, [Recolour(0, "green")], np.random.default_rng(i)) for i in range(100)]
    assert all(p != text and text in p for p in padded)
    first = [p.startswith(text) or p.startswith(f"first {text}") for p in padded]
    assert 20 < sum(first) < 80                                     # both places, about equally often


def test_the_builder_pads_only_simple_sft_instructions_and_changes_nothing_else(tmp_path):
    plain = build_toy_dataset(tmp_path / "plain", **KW)
    padded = build_toy_dataset(tmp_path / "padded", **KW, noop_clause=1.0)
    half = build_toy_dataset(tmp_path / "half", **KW, noop_clause=0.5)
    for name in ("grpo", "eval"):                                   # prompts and held-out data: byte for byte
        assert plain[name].read_bytes() == padded[name].read_bytes() == half[name].read_bytes()
    a, b, c = _records(plain["sft"]), _records(padded["sft"]), _records(half["sft"])
    assert [{**r, "instruction": None} for r in a] == [{**r, "instruction": None} for r in b]
    for ra, rb in zip(a, b):
        assert ra["instruction"] in rb["instruction"] and ra["instruction"] != rb["instruction"], rb["instruction"]
        # the kept object is never the one the edit acts on
        op = op_from_json(rb["ops"][0])
        if getattr(op, "index", None) is not None:
            obj = scene_from_json(rb["scene"]).objects[op.index]
            rest = rb["instruction"].replace(ra["instruction"], "")
            assert f"{obj.colour} {obj.shape}" not in rest, rb["instruction"]
    changed = [ra["instruction"] != rc["instruction"] for ra, rc in zip(a, c)]
    assert 0 < sum(changed) < len(changed)
    # the padded records of the 0.5 build are exactly those of the 1.0 build (one draw decides, its own stream)
    assert all(rc["instruction"] == rb["instruction"] for rb, rc, ch in zip(b, c, changed) if ch)
    assert json.loads(padded["world"].read_text())["noop_clause"] == 1.0
    with pytest.raises(UserError, match="noop_clause"):
        build_toy_dataset(tmp_path / "bad", **KW, noop_clause=1.5)


def test_a_cached_world_is_rebuilt_when_noop_clause_changes(tmp_path):
    old = [r["instruction"] for r in _records(ensure_toy_dataset(tmp_path / "w", **KW)["sft"])]
    world = json.loads((tmp_path / "w" / "world.json").read_text())
    world.pop("noop_clause")                                        # a world written before the parameter
    (tmp_path / "w" / "world.json").write_text(json.dumps(world))
    before = (tmp_path / "w" / "sft.jsonl").stat().st_mtime_ns
    ensure_toy_dataset(tmp_path / "w", **KW, noop_clause=0.0)       # the default: reused
    assert (tmp_path / "w" / "sft.jsonl").stat().st_mtime_ns == before
    paths = ensure_toy_dataset(tmp_path / "w", **KW, noop_clause=1.0)
    assert json.loads(paths["world"].read_text())["noop_clause"] == 1.0
    new = [r["instruction"] for r in _records(paths["sft"])]
    assert all(o in n and o != n for o, n in zip(old, new))


def test_the_chain_passes_toy_sft_noop_clause_to_its_data_stage(tmp_path, repo_root, monkeypatch):
    import viva_base.data.toy as data_toy
    from editgrpo.config import GRPOConfig
    from editgrpo.toy import shared_stages
    from viva_base.recipe import load_recipe

    class Built(Exception):
        pass

    seen = {}

    def fake(out, **kw):
        seen.update(kw)
        raise Built

    monkeypatch.chdir(repo_root)
    monkeypatch.setattr(data_toy, "ensure_toy_dataset", fake)
    with pytest.raises(Built):
        shared_stages(load_recipe(GRPOConfig, ["recipe=recipes/toy.yaml", "toy.sft_noop_clause=0.25"]), tmp_path)
    assert seen["noop_clause"] == 0.25
