"""Per-component advantage normalisation (train.reward_normalization: component) and the pixel_sp reward."""
import math

import pytest
import torch

from editgrpo.grpo import component_advantages, group_advantages
from rewards import CombinedReward, build_reward
from rewards.pixel import pixel_sp_score

EPS = 1e-4


def test_component_advantages_hand_checked():
    # one group of 2: component a = [0, 10] (advantages -1, +1 up to eps), b = [1.0, 0.9] (+1, -1)
    comps = {"a": torch.tensor([0.0, 10.0]), "b": torch.tensor([1.0, 0.9])}
    groups = torch.tensor([0, 0])
    out = component_advantages(comps, {"a": 1.0, "b": 3.0}, groups)
    ua, ub = 5 / (5 + EPS), 0.05 / (0.05 + EPS)
    assert torch.allclose(out.advantages, torch.tensor([-ua + 3 * ub, ua - 3 * ub]), atol=1e-6)
    # normalising the total instead lets the large-spread component decide alone, whatever the weights
    total = group_advantages(comps["a"] + 3 * comps["b"], groups).advantages
    assert total[1] > 0 > out.advantages[1]


def test_component_advantages_match_a_reference_and_ignore_zero_weights():
    gen = torch.Generator().manual_seed(1)
    comps = {k: torch.randn(24, generator=gen) * s for k, s in (("x", 5.0), ("y", 0.01), ("z", 1.0))}
    groups = torch.arange(24) % 3
    w = {"x": 1.0, "y": 0.5, "z": 0.0}
    out = component_advantages(comps, w, groups, clip=None)
    want = sum(w[k] * group_advantages(comps[k], groups).advantages for k in ("x", "y"))
    assert torch.allclose(out.advantages, want, atol=1e-6)
    # the logged group statistics describe the weighted total
    tot = group_advantages(comps["x"] + 0.5 * comps["y"], groups)
    assert torch.allclose(out.group_mean, tot.group_mean) and torch.allclose(out.group_std, tot.group_std)
    clipped = component_advantages(comps, w, groups, clip=0.5)
    assert torch.allclose(clipped.advantages, want.clamp(-0.5, 0.5), atol=1e-6)


def test_component_advantages_nan_and_constant_groups():
    comps = {"a": torch.tensor([1.0, 2.0, math.nan, 4.0, 5.0, 5.0]), "b": torch.tensor([0.0, 1.0, 2.0, 3.0, 7.0, 7.0])}
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    out = component_advantages(comps, {"a": 1.0, "b": 1.0}, groups)
    assert out.valid.tolist() == [True, True, False, True, True, True]
    assert out.advantages[2] == 0                                          # the NaN sample is not trained
    assert out.zero_variance.tolist() == [False] * 4 + [True, True]        # group 1: both components constant
    assert torch.equal(out.advantages[4:], torch.zeros(2))
    # the NaN sample is left out of group 0's statistics for every component (b too)
    want_b = group_advantages(torch.tensor([0.0, 1.0, math.nan, 3.0]), groups[:4]).advantages
    want_a = group_advantages(comps["a"][:4], groups[:4]).advantages
    assert torch.allclose(out.advantages[:4], want_a + want_b, atol=1e-6)


def test_component_advantages_errors():
    g = torch.tensor([0, 0])
    with pytest.raises(ValueError, match="every reward weight is 0"):
        component_advantages({"a": torch.ones(2)}, {"a": 0.0}, g)
    with pytest.raises(ValueError, match="no scores"):
        component_advantages({"a": torch.ones(2)}, {"a": 1.0, "b": 1.0}, g)


def test_pixel_sp_numbers_and_registry():
    gen = torch.Generator().manual_seed(0)
    src = torch.rand(2, 3, 3, 8, 8, generator=gen)
    edited = src.clone()
    edited[0] = (edited[0] + 0.1).clamp(0, 1)
    want_l1 = 1 - (edited - src).abs().flatten(1).mean(1)
    want_rms = 1 - (edited - src).pow(2).flatten(1).mean(1).sqrt()
    assert torch.allclose(pixel_sp_score(edited, src), want_l1.float(), atol=1e-7)
    assert torch.allclose(pixel_sp_score(edited, src, "rms"), want_rms.float(), atol=1e-7)
    texts = dict(source_captions=["a", "b"], target_captions=["c", "d"], instructions=["e", "f"])
    out = build_reward("pixel_sp")(edited, src, **texts)
    assert out.scores[1] == 1.0 and torch.allclose(out.scores, want_l1.float(), atol=1e-7)
    # frame sampling and a resized edit
    first = build_reward("pixel_sp", frames={"num": 1})(edited, src, **texts).scores
    assert torch.allclose(first, pixel_sp_score(edited[:, :1], src[:, :1]), atol=1e-7)
    flat = torch.full((2, 3, 3, 8, 8), 0.25)
    big = torch.full((2, 3, 3, 16, 16), 0.75)  # another size: resized to the source's before comparing
    assert torch.allclose(build_reward("pixel_sp")(big, flat, **texts).scores, torch.full((2,), 0.5), atol=1e-6)
    combo = CombinedReward.from_config({"pixel_sp": {"weight": 2.0, "metric": "rms"}})
    assert torch.allclose(combo(edited, src, **texts).total, 2 * want_rms.float(), atol=1e-6)
    with pytest.raises(ValueError, match="metric"):
        build_reward("pixel_sp", metric="ssim")
