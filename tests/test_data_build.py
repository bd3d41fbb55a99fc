"""The paired-data pipeline's pure parts: inputs, sharding, record folders, caption rules, masks, clip
fitting, edges, the direction rule, fingerprints and the command line (no models)."""
from __future__ import annotations

import hashlib
import json
import math
import random

import numpy as np
import pytest
import torch

from viva_base.data.build.cli import BuildConfig, cli, normalize_argv, stage_fingerprints
from viva_base.data.build.models import masked_source, parse_json_answer, paste_back
from viva_base.data.build.records import (RecordStore, combine_shards, in_shard, list_inputs, parse_shard, safe_id,
                                          write_outputs)
from viva_base.data.build.stages import (REAL_TO_SYNTH, SYNTH_TO_REAL, as_bool, canny_edges, change, choose_directions,
                                         cover_side, dilate, edit_type, fit_clip, random_mask, sample_frames)
from viva_base.data.build.text import (article, find_objects, global_caption, GLOBAL_EDITS, plural, remove_object,
                                       replace_object, rule_instructions)
from viva_base.errors import UserError
from viva_base.recipe import load_recipe
from viva_base.video import write_video


# ---------------------------------------------------------------------------------------------- sharding
def test_parse_shard():
    assert parse_shard(None) == (0, 1) and parse_shard("") == (0, 1)
    assert parse_shard("2/5") == (2, 5) and parse_shard(" 0 / 1 ") == (0, 1)
    for bad in ("5/5", "a/b", "-1/3", "1/0", "3"):
        with pytest.raises(UserError, match="shard="):
            parse_shard(bad)


def test_shards_partition_ids_by_an_independent_hash():
    ids = [f"clip_{i:03d}" for i in range(300)]
    n = 4
    owners = {i: [k for k in range(n) if in_shard(i, k, n)] for i in ids}
    assert all(len(v) == 1 for v in owners.values())  # every id in exactly one shard
    for i in ids:  # reference: sha256 of the JSON ["shard", id], first 8 bytes big-endian, mod n
        ref = int.from_bytes(hashlib.sha256(json.dumps(["shard", i], separators=(",", ":")).encode()).digest()[:8], "big")
        assert owners[i] == [ref % n]
    sizes = [sum(1 for v in owners.values() if v == [k]) for k in range(n)]
    assert min(sizes) > 300 / n / 2  # roughly balanced
    # machines x accelerate processes: (i/n, r/w) -> (i w + r)/(n w), a partition of the n w shards
    glob = {combine_shards((i, 2), (r, 3)) for i in range(2) for r in range(3)}
    assert glob == {(k, 6) for k in range(6)}


# ---------------------------------------------------------------------------------------------- inputs
def test_list_inputs_from_a_folder_and_a_manifest(tmp_path):
    clip = torch.rand(2, 3, 8, 8)
    (tmp_path / "vids" / "a").mkdir(parents=True)
    write_video(tmp_path / "vids" / "a" / "x y.mp4", clip)
    (tmp_path / "vids" / "a" / "x y.txt").write_text("  A dog runs.\n")
    write_video(tmp_path / "vids" / "z.mkv", clip)
    items = list_inputs(tmp_path / "vids")
    assert [(it.id, it.caption) for it in items] == [("a__x_y", "A dog runs."), ("z", "")]
    assert items[0].video == str((tmp_path / "vids" / "a" / "x y.mp4").resolve())

    man = tmp_path / "inputs.jsonl"
    man.write_text(json.dumps({"video": "vids/z.mkv", "caption": "A cat."}) + "\n\n"
                   + json.dumps({"id": "own/id", "source": str(tmp_path / "vids" / "a" / "x y.mp4"), "caption": "b"}) + "\n")
    items = list_inputs(man)
    assert [(it.id, it.caption) for it in items] == [("own__id", "b"), ("z", "A cat.")]
    assert items[1].video == str(tmp_path / "vids" / "z.mkv")
    man.write_text(json.dumps({"video": "a.mp4", "caption": "1"}) + "\n" + json.dumps({"video": "b/a.mp4", "caption": "2"}) + "\n")
    with pytest.raises(UserError, match="record id 'a'"):
        list_inputs(man)
    with pytest.raises(UserError, match="not found"):
        list_inputs(tmp_path / "missing")
    assert safe_id("../we ird/na:me") == "we_ird__na_me"


# ---------------------------------------------------------------------------------------------- records
def test_record_store_resumes_only_finished_records_with_the_same_fingerprint(tmp_path):
    store = RecordStore(tmp_path)
    assert store.load("r1") is None and not store.is_finished("r1", "fp")
    store.save_stage("r1", "replace", {"status": "ok", "fingerprint": "s1"})
    assert store.load_stage("r1", "replace", "s1")["status"] == "ok"
    assert store.load_stage("r1", "replace", "other") is None          # stale stage result
    # a kill while writing leaves only a temporary file: the record is not finished
    (store.folder("r1") / ".record.json.tmp123").write_text('{"status": "done", "fingerprint": "fp"}')
    assert store.load("r1") is None
    store.finish("r1", {"id": "r1", "status": "done", "fingerprint": "fp", "pairs": []})
    assert store.is_finished("r1", "fp") and not store.is_finished("r1", "fp2")
    store.finish("r2", {"id": "r2", "status": "failed", "fingerprint": "fp", "reason": "broken"})
    assert store.is_finished("r2", "fp") and not store.is_finished("r2", "fp", retry_failed=True)
    with pytest.raises(ValueError):
        store.finish("r3", {"status": "running"})
    assert store.folder("r1").parent.parent == tmp_path / "records" and len(store.folder("r1").parent.name) == 2
    assert sorted(r["id"] for _, r in store.finished()) == ["r1", "r2"]


def test_write_outputs_merges_records_into_a_manifest(tmp_path):
    from viva_base.data.manifest import read_manifest

    store = RecordStore(tmp_path)
    folder = store.folder("v")
    (folder / "s").mkdir(parents=True)
    for name in ("real.mp4", "s/synth.mp4"):
        write_video(folder / name, torch.rand(1, 3, 8, 8))
    pair = {"id": "v.add", "source": "s/synth.mp4", "target": "real.mp4", "mask": None, "instruction": "add a dog"}
    store.finish("v", {"id": "v", "status": "done", "fingerprint": "fp", "pairs": [pair]})
    store.finish("old", {"id": "old", "status": "done", "fingerprint": "stale", "pairs": [dict(pair, id="o")]})
    store.finish("bad", {"id": "bad", "status": "failed", "fingerprint": "fp", "reason": "VideoError: x"})
    counts = write_outputs(tmp_path, fingerprint_now="fp")
    assert counts == {"records_done": 1, "records_failed": 1, "records_stale": 1, "pairs": 1}
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert rows[0]["source"] == str((folder / "s/synth.mp4").relative_to(tmp_path))   # relative to the manifest
    recs = read_manifest(tmp_path / "pairs.jsonl")
    assert recs[0]["target"] == str((folder / "real.mp4").resolve())
    assert json.loads((tmp_path / "failed.jsonl").read_text()) == {"id": "bad", "input": None, "reason": "VideoError: x"}


# ---------------------------------------------------------------------------------------------- captions
def test_caption_rules():
    assert plural("bus") == "buses" and plural("puppy") == "puppies" and plural("teddy bear") == "teddy bears"
    assert plural("man") == "men" and plural("sheep") == "sheep" and plural("dog") == "dogs"
    assert article("apple") == "an" and article("cat") == "a"
    cap = "A teddy bear sits on a chair; two dogs and a man watch the teddy bear."
    assert find_objects(cap) == ["teddy bear", "chair", "dog"]
    assert find_objects(cap, max_objects=5) == ["teddy bear", "chair", "dog", "man"]
    assert find_objects("A bearded hotdog stand.") == []    # whole words only
    assert replace_object("A dog chases two dogs.", "dog", "elephant") == "An elephant chases two elephants."
    assert replace_object("Dogs run.", "dog", "cat") == "Cats run."
    assert remove_object("A brown dog and a cat play on the grass.", "cat") == "A brown dog play on the grass."
    assert remove_object("A dog.", "dog") == "the scene"
    assert global_caption("A street.", GLOBAL_EDITS["night"]) == f"A street, {GLOBAL_EDITS['night'].caption_suffix}."
    assert rule_instructions("replace", {"object": "dog", "new_object": "owl"}) == ("replace the dog with an owl",
                                                                                  "replace the owl with a dog")
    assert rule_instructions("remove", {"object": "apple"}) == ("remove the apple", "add an apple")


def test_parse_json_answer():
    assert parse_json_answer('Sure!\n```json\n{"caption": "x", "n": 1}\n```', ["caption"]) == {"caption": "x", "n": 1}
    assert parse_json_answer('{"a": 1} then {"objects": []}', ["objects"]) == {"objects": []}
    with pytest.raises(ValueError, match="objects"):
        parse_json_answer('{"object": ["dog"]}', ["objects"])
    assert as_bool("Yes") is True and as_bool(0) is False and as_bool("maybe") is None and as_bool(False) is False


# ---------------------------------------------------------------------------------------------- masks and clips
def test_random_mask_area_bounds_motion_and_determinism():
    h, w, f = 48, 64, 5
    for seed in range(20):
        m = random_mask(f, h, w, random.Random(seed), min_area=0.05, max_area=0.2, max_shift=0.3)
        assert m.shape == (f, h, w) and m.dtype == torch.bool
        area = m.float().mean(dim=(1, 2))
        # the discrete ellipse's area is pi a_x a_y up to its boundary pixels (perimeter / (H W))
        tol = 2 * math.pi * math.sqrt(0.2 * h * w / math.pi) * 2 / (h * w)
        assert ((area > 0.05 - tol) & (area < 0.2 + tol)).all()
        assert (area.max() - area.min()) < tol   # it moves, it does not grow
        ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        cx = torch.stack([(xs * fr).sum() / fr.sum() for fr in m.float()])
        steps = cx.diff()
        assert (steps - steps.mean()).abs().max() < 1.0          # linear motion of the centre
    assert torch.equal(random_mask(f, h, w, random.Random(3)), random_mask(f, h, w, random.Random(3)))
    with pytest.raises(UserError):
        random_mask(f, h, w, random.Random(0), min_area=0.3, max_area=0.2)


def test_dilate_matches_a_neighbourhood_maximum():
    m = torch.rand(3, 11, 13) > 0.9
    for r in (0, 1, 2):
        ref = np.zeros(m.shape, bool)
        a = m.numpy()
        for t in range(3):
            for i in range(11):
                for j in range(13):
                    ref[t, i, j] = a[t, max(0, i - r):i + r + 1, max(0, j - r):j + r + 1].any()
        assert np.array_equal(dilate(m, r).numpy(), ref)


def test_fit_clip_and_cover_side():
    frames = torch.rand(2, 3, 20, 40)
    assert torch.equal(fit_clip(frames, (20, 30)), frames[..., 5:35])     # same height: a pure centre crop
    assert torch.equal(fit_clip(frames, (10, 20)), fit_clip(frames, (10, 20)))
    assert fit_clip(frames, (16, 24)).shape == (2, 3, 16, 24)
    assert fit_clip(frames, (64, 64)).shape == (2, 3, 64, 64)              # scaled up to cover
    assert cover_side(1080, 1920, 480, 832) == math.ceil(max(480 / 1080, 832 / 1920) * 1920)
    assert cover_side(100, 100, 200, 50) is None


def test_canny_edges_find_a_step():
    img = torch.zeros(1, 3, 24, 32)
    img[..., 16:] = 1.0
    e = canny_edges(img, sigma=1.0)
    assert e.shape == (1, 3, 24, 32) and set(e.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(e[:, 0], e[:, 1]) and torch.equal(e[:, 0], e[:, 2])
    cols = e[0, 0].nonzero()[:, 1]
    assert len(cols) > 0 and cols.min() >= 14 and cols.max() <= 17
    assert canny_edges(torch.full((1, 3, 8, 8), 0.3)).sum() == 0


def test_inpainting_condition_and_paste_back_are_exact():
    v, g = torch.rand(2, 3, 6, 6), torch.rand(2, 3, 6, 6)
    m = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    m[..., 1:4, 2:5] = True
    src = masked_source(v, m, 0.5)
    assert torch.equal(src[m.expand_as(v)], torch.full((2 * 3 * 9,), 0.5)) and torch.equal(src[~m.expand_as(v)], v[~m.expand_as(v)])
    out = paste_back(g, v, m)
    assert torch.equal(out[m.expand_as(v)], g[m.expand_as(v)]) and torch.equal(out[~m.expand_as(v)], v[~m.expand_as(v)])
    assert change(v, out, m[:, 0]) == pytest.approx(float((v - g).abs()[m.expand_as(v)].mean()), rel=1e-6)
    assert sample_frames(torch.arange(9).view(9, 1, 1, 1).float(), 4).flatten().tolist() == [0, 3, 5, 8]


# ---------------------------------------------------------------------------------------------- decisions
def test_direction_rule():
    assert choose_directions("replace", None) == [SYNTH_TO_REAL]              # unlabelled: the real video is the target
    assert choose_directions("replace", {"artifacts": True, "edit_applied": True}) == [SYNTH_TO_REAL]
    assert choose_directions("replace", {"artifacts": False, "edit_applied": True}) == [REAL_TO_SYNTH]
    assert choose_directions("remove", {"artifacts": False, "edit_applied": True}) == [REAL_TO_SYNTH, SYNTH_TO_REAL]
    assert choose_directions("remove", {"artifacts": True, "edit_applied": True}) == [SYNTH_TO_REAL]
    assert choose_directions("global", {"artifacts": False, "edit_applied": False}) == []
    assert choose_directions("global", {"artifacts": False, "edit_applied": True}, ["global"]) == [REAL_TO_SYNTH, SYNTH_TO_REAL]
    assert [edit_type("remove", d) for d in (REAL_TO_SYNTH, SYNTH_TO_REAL)] == ["remove", "add"]
    assert edit_type("replace", SYNTH_TO_REAL) == "replace"


def test_fingerprints_follow_exactly_the_settings_a_stage_uses():
    base = load_recipe(BuildConfig, [])
    fp = stage_fingerprints(base)

    def changed(*overrides):
        new = stage_fingerprints(load_recipe(BuildConfig, list(overrides)))
        return {k for k in fp if fp[k] != new[k]}

    assert changed("shard=1/2", "output_dir=/elsewhere", "retry_failed=true", "vlm.timeout=5", "language.concurrency=1") == set()
    assert changed("filter.num_frames=2") == {"filter", "record"}
    assert changed("detector.box_threshold=0.1") == {"replace", "filter", "record"}
    assert changed("add_remove.mask=object", "detector.box_threshold=0.1") == {"replace", "add_remove", "filter", "record"}
    assert changed("global_edit.edits=[fog]") == {"global_edit", "filter", "record"}
    assert changed("generator.num_inference_steps=3") == {"replace", "add_remove", "global_edit", "filter", "record"}
    assert changed("vlm.base_url=http://x/v1") == {"filter", "record"}
    assert changed("stages=[replace]") == {"filter", "record"}


# ---------------------------------------------------------------------------------------------- command line
def test_command_line_errors_are_one_line(tmp_path, capsys, repo_root):
    assert normalize_argv(["recipe=r.yaml", "--shard", "1/4", "seed=3"]) == ["recipe=r.yaml", "shard=1/4", "seed=3"]
    assert cli(["--shard"]) == 2
    assert "--shard needs a value" in capsys.readouterr().err
    out = f"output_dir={tmp_path / 'o'}"
    assert cli([out, "--shard", "4/4", "inputs=x"]) == 2
    assert "shard='4/4'" in capsys.readouterr().err
    assert cli([out, "stages=[replace,paint]"]) == 2
    assert "unknown ['paint']" in capsys.readouterr().err
    assert cli([out, "detectr.model=tiny"]) == 2
    assert "did you mean 'detector'" in capsys.readouterr().err
    assert cli([out]) == 2
    assert "inputs is not set" in capsys.readouterr().err
    assert cli([out, f"inputs={tmp_path / 'nothing'}"]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # a refused command leaves no folder behind (it made an empty one)
    assert cli([out, "manifest_only=true"]) == 2  # it wrote an empty pairs.jsonl into a new folder
    assert "holds no records" in capsys.readouterr().err and not (tmp_path / "o").exists()
    # the recipe's generator is unset: the error names the key to set, before any record is built
    (tmp_path / "vids").mkdir()
    write_video(tmp_path / "vids" / "a.mp4", torch.rand(9, 3, 32, 32), 8.0)
    (tmp_path / "vids" / "a.txt").write_text("a cat")
    assert cli([f"recipe={repo_root}/recipes/data_build.yaml", out, f"inputs={tmp_path / 'vids'}"]) == 2
    err = capsys.readouterr().err
    assert "generator.model.pretrained" in err and "set exactly one of model." not in err
    assert not (tmp_path / "o" / "records").exists() or not any((tmp_path / "o" / "records").iterdir())
    cfg = load_recipe(BuildConfig, [f"recipe={repo_root}/recipes/data_build.yaml"])
    assert cfg.stages == ["replace", "add_remove", "global_edit"] and cfg.clip.frames == 33


@pytest.mark.parametrize("override, words", [
    ("detector.box_threshold=1.5", "detector.box_threshold=1.5: a fraction"),
    ("detector.text_threshold=-0.1", "detector.text_threshold"),
    ("tracker.dilate=-1", "tracker.dilate=-1 must be >= 0"),
    ("tracker.max_area=2", "tracker: need 0 <= min_area <= max_area <= 1"),
    ("tracker.min_area=0.8", "tracker: need 0 <= min_area <= max_area"),
    ("generator.num_inference_steps=0", "generator.num_inference_steps=0 must be > 0"),
    ("generator.guidance_scale=0", "generator.guidance_scale"),
    ("generator.fill=2", "generator.fill"),
    ("generator.model.shift=0", "generator.model.shift"),
    ("language.concurrency=0", "language.concurrency"),
    ("vlm.timeout=0", "vlm.timeout"),
    ("vlm.max_retries=-1", "vlm.max_retries"),
    ("replace.max_objects=0", "replace.max_objects"),
    ("global_edit.canny_sigma=0", "global_edit.canny_sigma"),
    ("global_edit.canny_low=0.3", "canny_low=0.3 is above canny_high=0.2"),
    ("filter.num_frames=0", "filter.num_frames"),
    ("filter.min_change=-1", "filter.min_change"),
])
def test_stage_values_are_checked_before_any_model_loads(tmp_path, repo_root, override, words):
    """These passed the recipe check and stopped the run (or failed every record) once Grounding DINO, SAM 2 and
    the editor were loaded; now each is one line naming its key."""
    from viva_base.data.build.cli import validate
    from viva_base.errors import UserError

    base = [f"recipe={repo_root}/recipes/data_build.yaml", f"output_dir={tmp_path / 'o'}", "inputs=x",
            "generator.model.tiny=true", "global_edit.canny_high=0.2"]
    validate(load_recipe(BuildConfig, base))
    with pytest.raises(UserError) as info:
        validate(load_recipe(BuildConfig, [*base, override]))
    assert words in str(info.value), str(info.value)
    assert not (tmp_path / "o").exists()
