"""The ``toy_oracle`` reward: the true toy edit accuracy through the reward registry (a diagnostic)."""
import json

import pytest
import torch

from rewards import CombinedReward, available_rewards, build_reward
from viva_base.data.toyworld.build import build_toy_dataset
from viva_base.data.toyworld.oracle import oracle_scores
from viva_base.video import read_video


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_oracle")
    paths = build_toy_dataset(out, seed=5, workers=1, n_sft_video=2, n_sft_image=2, n_grpo=4,
                              n_eval_compound=3, n_eval_simple=2)
    return out, paths


def _load(out, rec, key):
    return read_video(out / rec[key]).frames


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_registered_and_scores_the_true_target_one(toy):
    out, paths = toy
    assert "toy_oracle" in available_rewards()
    recs = _records(paths["eval"])
    r = build_reward("toy_oracle", manifest=[str(paths["grpo"]), str(paths["eval"])])
    src = torch.stack([_load(out, x, "source") for x in recs])
    tgt = torch.stack([_load(out, x, "target") for x in recs])
    mask = torch.stack([(_load(out, x, "mask").amax(1, keepdim=True) > 0.5).float() for x in recs])
    kw = dict(source_captions=[x["source_caption"] for x in recs], target_captions=[x["target_caption"] for x in recs],
              instructions=[x["instruction"] for x in recs])
    # the rendered truth equals the target/mask files written by the data builder
    assert torch.equal(r(tgt, src, **kw).scores, torch.ones(len(recs)))
    # not editing at all: exactly the oracle of the source, computed independently from the files
    want = oracle_scores(src, src, tgt, mask)["oracle"].float()
    got = r(src, src, **kw)
    assert torch.allclose(got.scores, want, atol=1e-6) and (got.scores < 1).all()
    assert set(got.details[0]) == {"if_error", "sp_error"}
    # one-sided components
    sp = build_reward("toy_oracle", manifest=str(paths["eval"]), component="sp")(src, src, **kw).scores
    assert torch.equal(sp, torch.zeros(len(recs)))
    noisy = (tgt + 0.1 * torch.randn_like(tgt)).clamp(0, 1)
    assert (r(noisy, src, **kw).scores < 1).all()


def test_grpo_prompts_are_found_and_weight_zero_only_logs(toy):
    out, paths = toy
    recs = _records(paths["grpo"])
    src = torch.stack([_load(out, x, "source") for x in recs])
    combo = CombinedReward.from_config({"toy_oracle": {"weight": 0.0, "manifest": str(paths["grpo"])}})
    res = combo(src, src, source_captions=[x["source_caption"] for x in recs],
                target_captions=[x["target_caption"] for x in recs], instructions=[x["instruction"] for x in recs])
    assert torch.equal(res.total, torch.zeros(len(recs)))             # logged only
    assert (res.components["toy_oracle"] < 1).all()                  # every compound prompt changes pixels


def test_errors_name_the_problem(toy, tmp_path):
    out, paths = toy
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_reward("toy_oracle", manifest=str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x", "source_caption": "y"}) + "\n")
    with pytest.raises(ValueError, match="not a toy-world manifest"):
        build_reward("toy_oracle", manifest=str(bad))
    with pytest.raises(ValueError, match="component"):
        build_reward("toy_oracle", manifest=str(paths["eval"]), component="nope")
    r = build_reward("toy_oracle", manifest=str(paths["eval"]))
    v = torch.zeros(1, 9, 3, 32, 32)
    with pytest.raises(KeyError, match="not in the manifest"):
        r(v, v, source_captions=["a"], target_captions=["b"], instructions=["c"])
