"""The toy world's dataset builder: manifests, files, splits, determinism and the CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from viva_base.data.manifest import read_manifest
from viva_base.data.pairs import PairDataset
from viva_base.data.toyworld.build import build_toy_dataset
from viva_base.data.toyworld.edits import EDIT_TYPES, apply, edit_mask, op_from_json
from viva_base.data.toyworld.pairs import scene_fingerprint, split_combos
from viva_base.data.toyworld.render import render_tensor
from viva_base.data.toyworld.scene import Scene, scene_from_json
from viva_base.errors import UserError
from viva_base.video import read_video

ROOT = Path(__file__).resolve().parents[1]
COUNTS = dict(n_sft_video=12, n_sft_image=10, n_grpo=10, n_eval_compound=8, n_eval_simple=5)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    paths = build_toy_dataset(out, seed=3, workers=1, **COUNTS)
    return out, paths


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _ops(rec):
    return [op_from_json(o) for o in rec["ops"]]


def _combo(rec):
    return tuple(sorted(o["op"] for o in rec["ops"]))


def test_manifests_parse_and_have_the_documented_fields(toy):
    out, paths = toy
    assert set(paths) == {"sft", "grpo", "eval", "world"}
    sft, grpo, ev = _lines(paths["sft"]), _lines(paths["grpo"]), _lines(paths["eval"])
    assert len(sft) == 22 and len(grpo) == 10 and len(ev) == 13
    common = {"id", "source", "source_caption", "target_caption", "instruction", "reference", "edit_type", "ops"}
    for rec in sft:
        assert common | {"target", "mask"} <= set(rec) and rec["reference"] is None
    for rec in grpo:
        assert common <= set(rec) and "target" not in rec and "mask" not in rec
    for rec in ev:
        assert common | {"target", "mask", "split"} <= set(rec)
    for rec in sft + grpo + ev:
        for key in ("source", "target", "mask"):
            if key in rec:
                assert not os.path.isabs(rec[key]) and rec[key].startswith("videos/")
    # the project's manifest reader accepts each kind
    assert len(read_manifest(paths["sft"], "pairs")) == 22
    assert len(read_manifest(paths["grpo"], "prompts")) == 10
    assert len(read_manifest(paths["eval"], "eval")) == 13
    world = json.loads(paths["world"].read_text())
    assert world["seed"] == 3 and world["frames"] == 9 and world["size"] == 32
    assert world["counts"]["sft_video"] == 12 and world["image_only_types"] == ["replace"]


def test_files_read_back_bit_exactly(toy):
    out, paths = toy
    for rec in _lines(paths["sft"])[::3] + _lines(paths["eval"])[::2] + _lines(paths["grpo"])[::4]:
        src = scene_from_json(rec["scene"])
        tgt = apply(src, _ops(rec))
        assert torch.equal(read_video(out / rec["source"]).frames, render_tensor(src))
        if "target" in rec:
            assert torch.equal(read_video(out / rec["target"]).frames, render_tensor(tgt))
            m = read_video(out / rec["mask"]).frames
            assert torch.equal(m, edit_mask(src, tgt).expand(-1, 3, -1, -1))


def test_removal_targets_equal_the_scene_rendered_without_the_object(toy):
    out, paths = toy
    removals = [r for r in _lines(paths["sft"]) + _lines(paths["eval"]) if r["edit_type"] == "remove"]
    assert removals
    for rec in removals:
        src = scene_from_json(rec["scene"])
        i = rec["ops"][0]["index"]
        without = Scene(src.background, src.objects[:i] + src.objects[i + 1:], src.num_frames, src.height,
                        src.width, src.seed)
        assert torch.equal(read_video(out / rec["target"]).frames, render_tensor(without))


def test_sft_is_simple_video_pairs_plus_image_pairs(toy):
    out, paths = toy
    sft = _lines(paths["sft"])
    videos = [r for r in sft if r["id"].startswith("sft-v")]
    images = [r for r in sft if r["id"].startswith("sft-i")]
    assert len(videos) == 12 and len(images) == 10
    assert {r["edit_type"] for r in videos} == set(EDIT_TYPES) - {"replace"}
    assert {r["edit_type"] for r in images} == set(EDIT_TYPES)
    assert all(len(r["ops"]) == 1 for r in sft)
    for r in images:
        assert r["source"].endswith(".png") and read_video(out / r["source"]).num_frames == 1
    for r in videos:
        assert read_video(out / r["source"]).num_frames == 9


def test_grpo_is_compound_and_eval_holds_out_scenes_and_combos(toy):
    out, paths = toy
    seen, held = split_combos(3, 0.3)
    assert set(seen).isdisjoint(held) and len(seen) + len(held) == 20 and held
    grpo, ev, sft = _lines(paths["grpo"]), _lines(paths["eval"]), _lines(paths["sft"])
    assert all(r["edit_type"] == "compound" and len(r["ops"]) >= 2 for r in grpo)
    assert all(_combo(r) in set(seen) for r in grpo)
    compound = [r for r in ev if r["split"] == "compound"]
    simple = [r for r in ev if r["split"] == "simple"]
    assert len(compound) == 8 and len(simple) == 5
    assert {r["edit_type"] for r in simple} == set(EDIT_TYPES)
    for r in compound:
        assert (_combo(r) in set(held)) == r["novel_combo"]
    assert any(r["novel_combo"] for r in compound) and not all(r["novel_combo"] for r in compound)
    eval_scenes = {scene_fingerprint(scene_from_json(r["scene"])) for r in ev}
    train_scenes = {scene_fingerprint(scene_from_json(r["scene"])) for r in sft + grpo}
    assert eval_scenes.isdisjoint(train_scenes)
    ids = [r["id"] for r in sft + grpo + ev]
    assert len(ids) == len(set(ids))


def test_sft_manifest_loads_in_the_pair_dataset(toy):
    out, paths = toy
    ds = PairDataset(read_manifest(paths["sft"], "pairs"))
    item = ds[0]
    rec = _lines(paths["sft"])[0]
    src = scene_from_json(rec["scene"])
    assert torch.equal(item["mask"], edit_mask(src, apply(src, _ops(rec))))
    assert ds[len(ds) - 1]["is_image"]


def test_same_seed_same_dataset_other_seed_other(tmp_path, toy):
    out, paths = toy
    again = build_toy_dataset(tmp_path / "a", seed=3, workers=2, **COUNTS)  # any number of writers
    for name in ("sft", "grpo", "eval", "world"):
        assert again[name].read_bytes() == paths[name].read_bytes(), name
    rec = _lines(paths["eval"])[0]
    for key in ("source", "target", "mask"):
        assert torch.equal(read_video(out / rec[key]).frames, read_video(tmp_path / "a" / rec[key]).frames)
    other = build_toy_dataset(tmp_path / "b", seed=4, workers=1, n_sft_video=3, n_sft_image=0, n_grpo=0,
                              n_eval_compound=0, n_eval_simple=0)
    assert _lines(other["sft"])[0]["scene"] != _lines(paths["sft"])[0]["scene"]


def test_geometry_and_overwrite_errors(tmp_path, toy):
    with pytest.raises(UserError, match="4k"):
        build_toy_dataset(tmp_path / "x", frames=8, n_sft_video=1)
    with pytest.raises(UserError, match="multiple of 16"):
        build_toy_dataset(tmp_path / "x", size=40, n_sft_video=1)
    with pytest.raises(UserError, match="n_grpo"):
        build_toy_dataset(tmp_path / "x", n_grpo=-1)
    with pytest.raises(UserError, match="choose from"):
        build_toy_dataset(tmp_path / "x", image_only_types=["resize"])
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="a_file is a file, so no folder can be made under it"):
        build_toy_dataset(tmp_path / "a_file" / "toy", **COUNTS)  # a NotADirectoryError traceback before
    out, _ = toy
    with pytest.raises(UserError, match="overwrite"):
        build_toy_dataset(out, seed=3, **COUNTS)


def test_cli_builds_a_tiny_dataset_quickly(tmp_path, timed_run):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc, elapsed, wall = timed_run(
        [sys.executable, "-m", "viva_base.data.toyworld.build", "--out", str(tmp_path / "cli"), "--seed", "1",
         "--n-sft-video", "4", "--n-sft-image", "2", "--n-grpo", "2", "--n-eval-compound", "2",
         "--n-eval-simple", "2", "--frames", "5", "--size", "16"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 30, f"CLI took {elapsed:.1f} CPU s ({wall:.1f} s wall; see the timed_run fixture)"
    sft = _lines(tmp_path / "cli" / "sft.jsonl")
    assert len(sft) == 6 and read_video(tmp_path / "cli" / sft[0]["source"]).frames.shape == (5, 3, 16, 16)
    bad = subprocess.run([sys.executable, "-m", "viva_base.data.toyworld.build", "--out", str(tmp_path / "bad"),
                          "--frames", "6"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and "4k + 1" in bad.stderr and "Traceback" not in bad.stderr


def test_building_in_process_leaves_the_torch_thread_count_alone(tmp_path):
    """Regression: the in-process build (workers=1, what the toy chain uses on 2 cores) set torch to one thread
    for good, so the chain's SFT and Edit-GRPO that follow in the same process ran on one core."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        build_toy_dataset(tmp_path / "t", seed=1, workers=1, n_sft_video=2, n_sft_image=1, n_grpo=1,
                          n_eval_compound=1, n_eval_simple=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_compound_sft_pairs_are_seen_combos_with_exact_targets(tmp_path, toy):
    """n_sft_compound_*: compound pairs of the seen combos only, exact targets, and the rest of the dataset is the
    same as without them (their examples come from streams of their own)."""
    from viva_base.data.toy import ensure_toy_dataset

    out, paths = toy
    counts = {**COUNTS, "n_sft_compound_video": 3, "n_sft_compound_image": 4}
    got = build_toy_dataset(tmp_path / "c", seed=3, workers=1, **counts)
    sft = _lines(got["sft"])
    comp = [r for r in sft if r["id"].startswith(("sft-cv", "sft-ci"))]
    assert len(comp) == 7 and all(r["edit_type"] == "compound" and len(r["ops"]) >= 2 for r in comp)
    seen, held = split_combos(3, 0.3)
    assert all(_combo(r) in set(seen) and _combo(r) not in set(held) for r in comp)
    for r in comp:
        src, n = scene_from_json(r["scene"]), read_video(tmp_path / "c" / r["source"]).num_frames
        assert n == (1 if r["id"].startswith("sft-ci") else 9)
        assert torch.equal(read_video(tmp_path / "c" / r["target"]).frames, render_tensor(apply(src, _ops(r))))
    simple = [r for r in sft if r not in comp]
    assert [r["instruction"] for r in simple] == [r["instruction"] for r in _lines(paths["sft"])]
    assert [r["instruction"] for r in _lines(got["eval"])] == [r["instruction"] for r in _lines(paths["eval"])]
    assert json.loads(got["world"].read_text())["counts"]["sft_compound_image"] == 4
    # a world written before these counts existed holds none of them: reused, not rebuilt
    world = json.loads(paths["world"].read_text())
    for key in ("sft_compound_video", "sft_compound_image"):
        world["counts"].pop(key, None)
    paths["world"].write_text(json.dumps(world))
    mtime = paths["sft"].stat().st_mtime_ns
    ensure_toy_dataset(out, seed=3, n_sft_compound_video=0, n_sft_compound_image=0, **COUNTS)
    assert paths["sft"].stat().st_mtime_ns == mtime
