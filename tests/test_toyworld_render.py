"""The toy world's scene graph, renderer, edit operations, masks and instructions."""
import numpy as np
import pytest
import torch

from viva_base.data.toyworld.edits import (EDIT_TYPES, Add, EditError, Recolour, Remove, Replace, SetBackground,
                                           apply, apply_op, edit_mask, instruction, op_from_json, op_to_json)
from viva_base.data.toyworld.pairs import (ToyPairs, compound_combos, example_rng, ordered_types, random_scene,
                                           sample_example)
from viva_base.data.toyworld.render import (footprints, render, render_background, render_tensor, snow_flakes,
                                            trajectory, visible_footprints)
from viva_base.data.toyworld.scene import (BACKGROUND_COLOURS, OBJECT_COLOURS, STYLES, VARIANTS, Background, Obj,
                                           Scene, caption, scene_from_json, scene_to_json)

GREY = np.array(BACKGROUND_COLOURS["grey"], dtype=np.uint8)


def plain(colour="grey", variant="day", style="plain"):
    return Background(style, colour, variant)


# ------------------------------------------------------------------------------------ renderer

@pytest.mark.parametrize("shape,count", [("square", 49), ("circle", 37), ("diamond", 25), ("triangle", 25),
                                         ("cross", 33)])
def test_shape_pixel_counts_by_hand(shape, count):
    # A small object (7 px, r = 3.5) centred on a pixel centre covers integer offsets (dx, dy) with:
    # square |dx|,|dy| <= 3 -> 7*7; circle dx^2+dy^2 <= 12.25 -> 7+2*7+2*5+2*3; diamond |dx|+|dy| <= 3 -> 25;
    # triangle |dx| <= (dy+3.5)/2 -> 1+1+3+3+5+5+7; cross arms 3 px wide -> 21+21-9.
    scene = Scene(plain(), (Obj(shape, "red", "small", 16.5, 16.5),), num_frames=1)
    frame = render(scene)[0]
    is_red = np.all(frame == OBJECT_COLOURS["red"], axis=-1)
    assert is_red.sum() == count
    assert np.all(frame[~is_red] == GREY)
    rows, cols = np.nonzero(is_red)
    assert rows.min() >= 13 and rows.max() <= 19 and cols.min() >= 13 and cols.max() <= 19
    if shape == "triangle":  # apex up: 1 pixel in the top row, 7 in the bottom one
        assert is_red[13].sum() == 1 and is_red[19].sum() == 7


def test_square_exact_position():
    scene = Scene(plain(), (Obj("square", "blue", "large", 10.5, 20.5),), num_frames=1)  # 11 px: r = 5.5
    is_blue = np.all(render(scene)[0] == OBJECT_COLOURS["blue"], axis=-1)
    expected = np.zeros((32, 32), bool)
    expected[15:26, 5:16] = True  # rows 20.5 +- 5 -> 15..25, cols 10.5 +- 5 -> 5..15
    assert np.array_equal(is_blue, expected)


def test_trajectory_bounces_off_the_border():
    obj = Obj("square", "red", "small", 27.5, 10.0, vx=1.0, vy=-2.0)  # x in [3.5, 28.5], y in [3.5, 28.5]
    cx, cy = trajectory(obj, 5, 32, 32)
    assert cx.tolist() == [27.5, 28.5, 27.5, 26.5, 25.5]
    assert cy.tolist() == [10.0, 8.0, 6.0, 4.0, 5.0]  # 4 - 2 = 2 reflects off 3.5 to 5


def test_night_tint_value():
    frame = render(Scene(plain(variant="night"), (), num_frames=1))[0]
    # round(128 * 0.3 + (8, 8, 30)) = (46, 46, 68)
    assert np.all(frame == np.array([46, 46, 68], dtype=np.uint8))


def test_snow_is_deterministic_and_falls():
    a, b = snow_flakes(7, 9, 32, 32), snow_flakes(7, 9, 32, 32)
    assert np.array_equal(a, b) and not np.array_equal(a, snow_flakes(8, 9, 32, 32))
    assert 0 < a[0].sum() <= round(0.03 * 32 * 32)
    # every flake of frame t+1 had a flake 1 or 2 rows above it (wrapping) at frame t
    for t in range(8):
        for i, j in zip(*np.nonzero(a[t + 1])):
            assert a[t, (i - 1) % 32, j] or a[t, (i - 2) % 32, j]
    frames = render(Scene(plain(variant="snow"), (), num_frames=9, seed=7))
    assert np.array_equal(np.all(frames == 250, axis=-1), a)


def test_object_colours_are_far_from_every_background_pixel():
    for style in STYLES:
        for colour in BACKGROUND_COLOURS:
            for variant in VARIANTS:
                px = render_background(Scene(Background(style, colour, variant), (), num_frames=3, seed=1)).reshape(-1, 3)
                px = np.unique(px.astype(int), axis=0)
                for name, rgb in OBJECT_COLOURS.items():
                    dist = np.abs(px - np.array(rgb)).max(axis=1).min()
                    assert dist >= 40, (style, colour, variant, name, dist)


def test_render_is_deterministic_per_seed():
    s1 = random_scene(example_rng(3, "fresh", 5))
    s2 = random_scene(example_rng(3, "fresh", 5))
    s3 = random_scene(example_rng(3, "fresh", 6))
    assert s1 == s2 and s1 != s3
    assert np.array_equal(render(s1), render(s2))
    e1, e2 = sample_example(example_rng(0, "fresh", 1), ["remove"]), sample_example(example_rng(0, "fresh", 1), ["remove"])
    assert e1 == e2


def test_render_tensor_is_the_uint8_render_over_255():
    s = random_scene(example_rng(0, "fresh", 0), num_frames=5, height=48, width=32)
    t = render_tensor(s)
    assert t.shape == (5, 3, 48, 32) and t.dtype == torch.float32
    assert torch.equal(t, torch.from_numpy(render(s)).permute(0, 3, 1, 2).double().div(255).float())


def test_scene_validation():
    with pytest.raises(ValueError, match="distinct"):
        Scene(plain(), (Obj("square", "red", "small", 8, 8), Obj("square", "red", "large", 20, 20)))
    with pytest.raises(ValueError, match="unknown shape"):
        Obj("hexagon", "red", "small", 8, 8)
    s = random_scene(example_rng(1, "fresh", 2))
    assert scene_from_json(scene_to_json(s)) == s


# ------------------------------------------------------------------------------ edits & masks

def _two_objects(variant="day"):
    return Scene(plain(variant=variant), (Obj("circle", "blue", "large", 12.5, 12.5, 1.0, 0.5),
                                          Obj("square", "red", "small", 15.5, 14.5, -0.5, 1.0)), num_frames=9, seed=3)


def test_removal_target_is_the_scene_without_the_object_and_mask_is_its_visible_footprint():
    src = _two_objects()
    tgt = apply(src, [Remove(1)])
    expected = render(Scene(src.background, (src.objects[0],), 9, 32, 32, seed=3))
    assert np.array_equal(render(tgt), expected)
    mask = edit_mask(src, tgt)[:, 0].numpy().astype(bool)
    # red (on top) over blue or grey: every pixel of the red square changes, nothing else does
    assert np.array_equal(mask, visible_footprints(src)[1])
    assert mask.any(axis=(1, 2)).all()


def test_mask_of_occluded_object_excludes_hidden_pixels():
    src = _two_objects()
    tgt = apply(src, [Recolour(0, "green")])  # the blue circle lies under the red square
    mask = edit_mask(src, tgt)[:, 0].numpy().astype(bool)
    vis = visible_footprints(src)[0]
    assert np.array_equal(mask, vis)
    assert vis.sum() < footprints(src)[0].sum()  # the circle really is partly hidden


def test_background_change_mask_is_everything_but_the_objects():
    src = _two_objects()
    tgt = apply(src, [SetBackground(colour="sand")])
    mask = edit_mask(src, tgt)[:, 0].numpy().astype(bool)
    assert np.array_equal(mask, ~visible_footprints(src).any(axis=0))


def test_add_and_remove_read_in_both_directions():
    src = _two_objects()
    add = Add.place("triangle", "yellow", "large", "top right", "down", 32, 32)
    tgt = apply(src, [add])
    assert tgt.objects[-1] == add.obj
    back = apply(tgt, [Remove(len(tgt.objects) - 1)])
    assert back == src and np.array_equal(render(back), render(src))
    m_fwd, m_bwd = edit_mask(src, tgt), edit_mask(tgt, back)
    assert torch.equal(m_fwd, m_bwd)
    assert np.array_equal(m_fwd[:, 0].numpy().astype(bool), visible_footprints(tgt)[-1])
    # removing the top object and adding it back restores the scene
    top = src.objects[-1]
    assert apply(src, [Remove(1), Add(top)]) == src


def test_added_object_starts_at_the_named_place_and_moves_as_told():
    add = Add.place("square", "red", "small", "bottom left", "right", 32, 32)
    assert (add.obj.x, add.obj.y) == (8.0, 24.0)
    cx, cy = trajectory(add.obj, 3, 32, 32)
    assert cx.tolist() == [8.0, 9.0, 10.0] and cy.tolist() == [24.0, 24.0, 24.0]


def test_apply_rejects_ops_that_change_nothing():
    src = _two_objects()
    with pytest.raises(EditError):
        apply_op(src, Recolour(1, "red"))
    with pytest.raises(EditError):
        apply_op(src, Replace(1, "square"))
    with pytest.raises(EditError):
        apply_op(src, SetBackground(variant="day"))
    with pytest.raises(EditError):
        apply_op(src, Remove(2))
    with pytest.raises(EditError):  # a second red square
        apply_op(src, Replace(0, "square", "red"))


def test_mask_equals_changed_pixels_for_every_edit_type():
    for k, combo in enumerate([[t] for t in EDIT_TYPES] + compound_combos()):
        rng = example_rng(11, "fresh", k)
        ex = sample_example(rng, ordered_types(rng, combo))
        r = ex.render()
        changed = (r["source"] != r["target"]).any(dim=1, keepdim=True).float()
        assert torch.equal(r["mask"], changed)
        assert r["mask"].sum() > 0
        assert set(r["mask"].unique().tolist()) <= {0.0, 1.0}
        # each operation changes pixels of the scene it applies to
        scene = ex.source
        for op in ex.ops:
            nxt = apply_op(scene, op)
            assert edit_mask(scene, nxt).sum() > 0, (combo, op)
            scene = nxt
        assert scene == ex.target


def test_op_json_round_trip():
    ops = [Add.place("cross", "green", "small", "centre", "up", 32, 32), Remove(0), Replace(1, "circle"),
           Replace(0, "diamond", "purple"), Recolour(2, "orange"), SetBackground(style="checker", variant="snow")]
    for op in ops:
        assert op_from_json(op_to_json(op)) == op
    with pytest.raises(ValueError, match="unknown op"):
        op_from_json({"op": "resize"})


# --------------------------------------------------------------------- captions & instructions

def test_caption_lists_objects_and_background():
    s = _two_objects(variant="night")
    assert caption(s) == "a large blue circle and a small red square on a plain grey background at night"
    assert caption(apply(s, [Remove(0), Remove(0)])) == "an empty plain grey background at night"
    s3 = apply(s, [SetBackground(style="stripes", colour="sand", variant="snow"),
                   Add.place("cross", "green", "small", "centre", "still", 32, 32)])
    assert caption(s3) == ("a large blue circle, a small red square and a small green cross "
                           "on a sand striped background in the snow")


def test_instructions_mention_the_right_attributes():
    rng = np.random.default_rng(0)
    src = _two_objects()
    for _ in range(20):
        t = instruction(src, [Remove(1)], rng)
        assert "red" in t and "square" in t and "blue" not in t
        t = instruction(src, [Recolour(0, "green")], rng)
        assert "blue" in t and "circle" in t and t.rstrip().endswith("green")
        t = instruction(src, [Replace(1, "diamond", "yellow")], rng)
        assert all(w in t for w in ("red", "square", "yellow", "diamond"))
        t = instruction(src, [SetBackground(variant="night")], rng)
        assert "night" in t
        t = instruction(src, [SetBackground(style="checker", colour="mint")], rng)
        assert "mint" in t
        add = Add.place("triangle", "orange", "large", "top left", "left", 32, 32)
        t = instruction(src, [add], rng)
        assert all(w in t for w in ("large orange triangle", "top left", "left"))
        t = instruction(src, [Remove(1), SetBackground(variant="snow")], rng)
        assert "red square" in t.replace("square that is red", "red square") and "snow" in t


def test_sampled_examples_captions_follow_the_ops():
    for i in range(30):
        rng = example_rng(5, "fresh", i)
        kind = EDIT_TYPES[i % len(EDIT_TYPES)]
        ex = sample_example(rng, [kind])
        assert ex.edit_type == kind
        op = ex.ops[0]
        if kind == "remove":
            gone = ex.source.objects[op.index]
            assert f"{gone.colour} {gone.shape}" in ex.source_caption
            assert f"{gone.colour} {gone.shape}" not in ex.target_caption
            assert gone.colour in ex.instruction and gone.shape in ex.instruction
        elif kind == "add":
            assert op.obj.phrase() in ex.target_caption and op.obj.phrase() not in ex.source_caption
        elif kind == "recolour":
            o = ex.source.objects[op.index]
            assert f"{op.colour} {o.shape}" in ex.target_caption and op.colour in ex.instruction
        elif kind == "replace":
            assert op.shape in ex.instruction and op.shape in ex.target_caption
        else:
            assert ex.source_caption != ex.target_caption


def test_toy_pairs_items_are_deterministic_tensors():
    ds = ToyPairs(seed=1, length=4, compound=True, num_frames=5)
    a, b = ds[2], ToyPairs(seed=1, length=4, compound=True, num_frames=5)[2]
    assert a["instruction"] == b["instruction"] and torch.equal(a["target"], b["target"])
    assert a["source"].shape == (5, 3, 32, 32) and a["mask"].shape == (5, 1, 32, 32)
    assert a["edit_type"] == "compound" and len(a["ops"]) >= 2
    img = ToyPairs(seed=1, length=2, edit_types=["replace"], num_frames=1)[0]
    assert img["is_image"] and img["source"].shape[0] == 1 and img["edit_type"] == "replace"
    with pytest.raises(IndexError):
        ds[4]
