"""The reward registry: names, errors, the weighted combination, and a plugin installed by pip."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from rewards import (
    ENTRY_POINT_GROUP,
    CombinedReward,
    Reward,
    RewardOutput,
    available_rewards,
    build_reward,
    register_reward,
    weighted_total,
)
from rewards.tiny import make_tiny_hf_clip

BUILTINS = {"clip_if", "clip_sp", "pickscore", "hps", "vlm_judge", "pixel_sp", "toy_oracle"}


def batch(b=2, f=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    edited, source = torch.rand(b, f, 3, 32, 32, generator=g), torch.rand(b, f, 3, 32, 32, generator=g)
    texts = dict(source_captions=["a cat", "a dog", "a car"][:b], target_captions=["a red cat", "a dog", "a bus"][:b],
                 instructions=["make it red", "keep it", "make it a bus"][:b])
    return edited, source, texts


@register_reward("test_mean_pixel")
class MeanPixel(Reward):
    """Test reward: mean pixel value of the edited video; NaN where the instruction says 'fail'."""

    def __init__(self, offset: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.offset = offset

    def score(self, edited, source, *, source_captions, target_captions, instructions, references):
        scores = self.sample_frames(edited).mean(dim=(1, 2, 3, 4)) + self.offset
        scores[torch.tensor(["fail" in t for t in instructions])] = float("nan")
        return RewardOutput(scores, [{"instruction": t} for t in instructions])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_hf_clip(tmp_path_factory.mktemp("hf_clip"))


def test_builtins_are_available():
    assert BUILTINS <= set(available_rewards())
    assert available_rewards() == sorted(available_rewards())
    assert isinstance(build_reward("test_mean_pixel"), MeanPixel)
    assert build_reward("clip_if", model="hf:/nowhere").name == "clip_if"


def test_unknown_reward_lists_the_available_ones():
    with pytest.raises(KeyError) as info:
        build_reward("clip_iff")
    message = str(info.value)
    assert "unknown reward 'clip_iff'" in message and "did you mean 'clip_if'" in message
    for name in BUILTINS:
        assert name in message
    assert ENTRY_POINT_GROUP in message
    with pytest.raises(KeyError, match="available: "):
        CombinedReward.from_config({"no_such_reward": {"weight": 1.0}})


def test_bad_kwargs_and_weights_name_the_component():
    with pytest.raises(TypeError, match="rewards.test_mean_pixel"):
        CombinedReward.from_config({"test_mean_pixel": {"weight": 1.0, "bogus": 3}})
    with pytest.raises(ValueError, match="rewards.test_mean_pixel.weight"):
        CombinedReward.from_config({"test_mean_pixel": {"weight": "heavy"}})
    with pytest.raises(ValueError, match="frame sampling"):
        build_reward("clip_if", frames={"num": 0})
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_mean_pixel")(type("Other", (Reward,), {}))


def test_weighted_total_is_eq7_and_nan_policy():
    comps = {"a": torch.tensor([1.0, 2.0, float("nan")]), "b": torch.tensor([10.0, float("nan"), 1.0]),
             "c": torch.tensor([float("nan"), 5.0, 5.0])}
    total = weighted_total(comps, {"a": 0.5, "b": 2.0, "c": 0.0})  # c only logged
    assert total[0].item() == 0.5 * 1.0 + 2.0 * 10.0
    assert torch.isnan(total[1:]).all()


def test_combined_reward_from_dict_and_omegaconf(hf_dir):
    cfg = {
        "clip_if": {"weight": 1.0, "model": "hf:" + hf_dir},
        "clip_sp": {"weight": 0.5, "model": "hf:" + hf_dir, "frames": {"every": 2}},
        "brightness": {"type": "test_mean_pixel", "weight": 2.0, "offset": 1.0},
        "pickscore": {"weight": 0.0, "model": "hf:" + hf_dir},
    }
    edited, source, texts = batch()
    out = CombinedReward.from_config(cfg)(edited, source, **texts)
    assert set(out.components) == set(cfg)
    assert out.weights == {"clip_if": 1.0, "clip_sp": 0.5, "brightness": 2.0, "pickscore": 0.0}
    # every component equals the reward built on its own
    for name, entry in cfg.items():
        entry = dict(entry)
        entry.pop("weight")
        alone = build_reward(entry.pop("type", name), **entry)(edited, source, **texts).scores
        torch.testing.assert_close(out.components[name], alone, atol=1e-6, rtol=0)
    expected = out.components["clip_if"] + 0.5 * out.components["clip_sp"] + 2.0 * out.components["brightness"]
    torch.testing.assert_close(out.total, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.components["brightness"], edited.mean(dim=(1, 2, 3, 4)) + 1.0)
    assert out.details["brightness"] == [{"instruction": t} for t in texts["instructions"]]
    assert out.total.dtype == torch.float32 and out.total.shape == (2,)

    yaml = OmegaConf.create({"rewards": cfg})
    out2 = CombinedReward.from_config(yaml.rewards)(edited, source, **texts)
    torch.testing.assert_close(out2.total, out.total, atol=0, rtol=0)


def test_combined_nan_sample_is_nan_in_total():
    reward = CombinedReward.from_config({"test_mean_pixel": {"weight": 1.0}})
    edited, source, texts = batch()
    texts["instructions"] = ["fail please", "fine"]
    out = reward(edited, source, **texts)
    assert torch.isnan(out.total[0]) and torch.isfinite(out.total[1])
    # weight 0: the NaN is logged but does not reach the total
    zero = CombinedReward.from_config({"test_mean_pixel": {"weight": 0.0}, "clip": {"type": "test_mean_pixel"}})
    out = zero(edited, source, **texts)
    assert torch.isnan(out.components["test_mean_pixel"][0])
    assert torch.isnan(out.total[0])  # "clip" (weight 1 by default) fails too
    assert zero.weights["clip"] == 1.0


def plugin_files_from_docs() -> dict[str, str]:
    """The complete plugin package that docs/rewards.md shows (blocks after `<!-- plugin-file: NAME -->`)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "rewards.md").read_text()
    files = dict(re.findall(r"<!-- plugin-file: (\S+) -->\s*```\w*\n(.*?)```", text, flags=re.S))
    assert set(files) == {"pyproject.toml", "editgrpo_reward_example.py"}
    return files


def test_documented_plugin_installs_and_is_used_by_a_recipe(tmp_path, monkeypatch):
    package = tmp_path / "plugin"
    package.mkdir()
    for name, content in plugin_files_from_docs().items():
        (package / name).write_text(content)
    site = tmp_path / "site"
    assert "temporal_smoothness" not in available_rewards()
    # a real installation (pip builds the wheel and writes the .dist-info with entry_points.txt) into a
    # private site dir put on sys.path, so the shared environment is left untouched
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "--disable-pip-version-check", "--target", str(site), str(package)],
                   check=True, capture_output=True, timeout=240)
    assert list(site.glob("editgrpo_reward_example-0.1.0.dist-info/entry_points.txt"))
    monkeypatch.syspath_prepend(str(site))
    try:
        names = available_rewards()
        assert {"temporal_smoothness", "brightness_target"} <= set(names)
        assert BUILTINS <= set(names)

        recipe = OmegaConf.create(textwrap.dedent("""
            rewards:
              temporal_smoothness: {weight: 0.5, scale: 2.0, frames: {every: 2}}
              brightness_target: {weight: 3.0, target: 0.4}
              test_mean_pixel: {weight: 1.0}
        """))
        reward = CombinedReward.from_config(recipe.rewards)
        edited, source, texts = batch(b=2, f=4)
        out = reward(edited, source, **texts)
        smooth = -2.0 * (edited[:, 2] - edited[:, 0]).abs().mean(dim=(1, 2, 3))  # frames 0 and 2
        bright = -(edited.mean(dim=(1, 2, 3, 4)) - 0.4).abs()
        torch.testing.assert_close(out.components["temporal_smoothness"], smooth)
        torch.testing.assert_close(out.components["brightness_target"], bright)
        torch.testing.assert_close(out.total, 0.5 * smooth + 3.0 * bright + edited.mean(dim=(1, 2, 3, 4)))
        assert [d["mean_change"] for d in out.details["temporal_smoothness"]] == pytest.approx(
            (-smooth / 2).tolist())
        assert reward.rewards["temporal_smoothness"].name == "temporal_smoothness"
        with pytest.raises(TypeError, match="brightness_target"):
            build_reward("brightness_target", bogus=1)
        # the walkthrough's "Test it" snippet runs as written
        doc = (Path(__file__).resolve().parents[1] / "docs" / "rewards.md").read_text()
        snippet = re.search(r"```python\n(import torch\nfrom rewards import build_reward\n.*?)```", doc, flags=re.S)
        assert snippet, "docs/rewards.md lost its plugin test snippet"
        scope: dict = {}
        exec(snippet.group(1), scope)
        tests = [f for n, f in scope.items() if n.startswith("test_")]
        assert tests
        for t in tests:
            t()
    finally:
        sys.modules.pop("editgrpo_reward_example", None)


def test_plugin_factory_must_return_a_reward(monkeypatch):
    import importlib.metadata as md

    class FakeEntryPoint:
        name, value, group = "not_a_reward", "x:y", ENTRY_POINT_GROUP

        def load(self):
            return lambda **kw: "just a string"

    real = md.entry_points
    monkeypatch.setattr(md, "entry_points", lambda **kw: [FakeEntryPoint()] if kw.get("group") == ENTRY_POINT_GROUP
                        else real(**kw))
    assert "not_a_reward" in available_rewards()
    with pytest.raises(TypeError, match="not a rewards.Reward"):
        build_reward("not_a_reward")


def test_a_reward_module_added_to_the_package_is_found_without_being_listed(tmp_path, monkeypatch):
    """docs/rewards.md: inside this repository a module in rewards/ registers itself with @register_reward."""
    import sys

    import rewards
    from rewards.registry import _REGISTRY, available_rewards, build_reward

    (tmp_path / "my_new_reward.py").write_text(
        "import torch\n"
        "from rewards.base import Reward\n"
        "from rewards.registry import register_reward\n\n"
        "@register_reward('my_new_reward')\n"
        "class MyNew(Reward):\n"
        "    def __call__(self, edited, source, **kw):\n"
        "        return torch.full((edited.shape[0],), 0.5)\n")
    monkeypatch.setattr(rewards, "__path__", [*rewards.__path__, str(tmp_path)])
    try:
        assert "my_new_reward" in available_rewards()
        assert build_reward("my_new_reward").__class__.__name__ == "MyNew"
    finally:
        _REGISTRY.pop("my_new_reward", None)
        sys.modules.pop("rewards.my_new_reward", None)
