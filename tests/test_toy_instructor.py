"""The toy chain's pretrained instructor (viva_base/toy_instructor.py) and the parse it learns (edit_parse)."""
import json

import pytest
import torch

from viva_base.data.toyworld.edits import Recolour, Remove, Replace, SetBackground, edit_parse, parse_slots
from viva_base.data.toyworld.scene import Background, Obj, Scene


def _names(vec):
    names = [f"{slot}={v}" for slot, values in parse_slots() for v in values]
    return sorted(names[i] for i in vec.nonzero().flatten().tolist())


def _scene():
    objs = (Obj("square", "red", "small", 8.0, 8.0, 0.0, 0.0), Obj("circle", "blue", "large", 20.0, 20.0, 0.0, 0.0))
    return Scene(Background("plain", "grey", "day"), objs, 9, 32, 32, 1)


def test_edit_parse_names_the_operation_its_object_and_its_arguments():
    assert _names(edit_parse([Recolour(0, "green")], _scene())) == sorted(
        ["op=recolour", "object_colour=red", "object_shape=square", "object_size=small", "new_colour=green"])
    assert _names(edit_parse([SetBackground(variant="night")], _scene())) == ["background_variant=night", "op=background"]
    # compound: the union, each operation's object read in the scene the operations before it left
    got = _names(edit_parse([Replace(1, "triangle", "yellow"), Recolour(1, "purple")], _scene()))
    assert got == sorted(["op=replace", "op=recolour", "object_colour=blue", "object_shape=circle",
                          "object_colour=yellow", "object_shape=triangle", "object_size=large",
                          "new_shape=triangle", "new_colour=yellow", "new_colour=purple"])
    assert edit_parse([Remove(0)], _scene()).shape == (sum(len(v) for _, v in parse_slots()),)


@pytest.fixture(scope="module")
def toy_manifest(tmp_path_factory):
    from viva_base.data.toy import ensure_toy_dataset

    out = tmp_path_factory.mktemp("toy")
    return ensure_toy_dataset(out, seed=0, n_sft_video=4, n_sft_image=60, n_grpo=0, n_eval_compound=0,
                              n_eval_simple=5, frames=5, size=32)


def test_pretraining_teaches_the_parse_freezes_it_and_is_cached(toy_manifest, tmp_path):
    from omegaconf import OmegaConf

    from viva_base.toy_instructor import pretrain_toy_instructor
    from viva_base.tiny import TinySpec, make_tiny_editor
    from viva_base.training import load_editor

    spec = OmegaConf.to_container(OmegaConf.load("recipes/sft_toy.yaml").model.tiny_spec)
    folder, fp = pretrain_toy_instructor(tmp_path / "ti", [toy_manifest["sft"]], spec, steps=60, batch_size=8,
                                         heldout=toy_manifest["eval"], progress=False)
    stage = json.loads((tmp_path / "ti" / "stage.json").read_text())
    log = stage["log"]
    assert log[0]["step"] == 1 and log[-1]["loss"] < 0.5 * log[0]["loss"]   # it learns the parse
    assert stage["train_instructions"] == 64 and stage["heldout"]["all"]["n"] == 5
    saved, fresh = load_editor(folder), make_tiny_editor(TinySpec(**spec), seed=0)
    changed = [not torch.equal(a, b) for a, b in zip(saved.instructor.state_dict().values(),
                                                      fresh.instructor.state_dict().values())]
    assert any(changed)
    assert all(not p.requires_grad for p in saved.instructor.parameters())
    # the DiT is the tiny random one the SFT stage trains
    assert all(torch.equal(a, b) for a, b in zip(saved.transformer.state_dict().values(),
                                                  fresh.transformer.state_dict().values()))
    # cached by its settings and data: the same call reuses it, other settings retrain
    mtime = (folder / "editor_config.json").stat().st_mtime_ns
    assert pretrain_toy_instructor(tmp_path / "ti", [toy_manifest["sft"]], spec, steps=60, batch_size=8,
                                   progress=False) == (folder, fp)
    assert (folder / "editor_config.json").stat().st_mtime_ns == mtime
    _, fp2 = pretrain_toy_instructor(tmp_path / "ti", [toy_manifest["sft"]], spec, steps=3, progress=False)
    assert fp2 != fp and json.loads((tmp_path / "ti" / "stage.json").read_text())["settings"]["steps"] == 3


def test_compound_instructions_are_text_of_seen_combos_off_the_eval_scenes(toy_manifest, tmp_path):
    """toy.instructor_compound: instruction-only compound records (no video, target or mask) of the world's seen
    combos, a pure function of the seed, never on an evaluation scene; the instructor stage trains on them."""
    from editgrpo.toy import compound_instructions
    from viva_base.data.manifest import read_jsonl
    from viva_base.data.toyworld.build import instruction_records
    from viva_base.data.toyworld.edits import op_from_json, op_type
    from viva_base.data.toyworld.pairs import scene_fingerprint
    from viva_base.data.toyworld.scene import scene_from_json
    from viva_base.toy_instructor import _records

    world = json.loads(toy_manifest["world"].read_text())
    seen = {tuple(sorted(c)) for c in world["grpo_combos"]}
    path = compound_instructions(tmp_path / "ci.jsonl", toy_manifest, 40)
    recs = [r for _, r in read_jsonl(path)]
    assert len(recs) == 40 and len(_records([path])) == 40    # what pretrain_toy_instructor reads
    assert all(not {"source", "target", "mask"} & set(r) for r in recs)
    types = [tuple(sorted(op_type(op_from_json(o)) for o in r["ops"])) for r in recs]
    assert set(types) <= seen and len(set(types)) == min(40, len(seen))   # every seen combo, no held-out one
    evals = {scene_fingerprint(scene_from_json(r["scene"])) for _, r in read_jsonl(toy_manifest["eval"])}
    assert not evals & {scene_fingerprint(scene_from_json(r["scene"])) for r in recs}
    assert instruction_records(0, 40, world["grpo_combos"], frozenset(evals), frames=5, size=32) == recs
    before = path.read_bytes()
    assert compound_instructions(tmp_path / "ci.jsonl", toy_manifest, 40).read_bytes() == before   # cached
    assert instruction_records(1, 5, world["grpo_combos"]) != recs[:5]


def test_the_chain_instructor_stage_reads_the_compound_instructions(toy_manifest, tmp_path, repo_root, monkeypatch):
    from omegaconf import OmegaConf

    from editgrpo.config import ToyChainConfig
    from editgrpo.toy import _instructor_stage

    monkeypatch.chdir(repo_root)
    n_train = sum(1 for line in toy_manifest["sft"].read_text().splitlines() if line.strip())
    for extra, folder in ((0, "plain"), (24, "more")):
        t = OmegaConf.merge(OmegaConf.structured(ToyChainConfig), {"instructor_steps": 2, "instructor_compound": extra})
        _, fp = _instructor_stage(t, tmp_path / folder, toy_manifest)
        stage = json.loads((tmp_path / folder / "stage.json").read_text())
        assert stage["train_instructions"] == n_train + extra, stage["train_instructions"]
        assert (tmp_path / folder / "compound_instructions.jsonl").exists() == bool(extra)
