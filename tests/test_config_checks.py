"""Config values a user can get wrong fail at once: one line, exit code 2, before any data, editor or reward model."""
import os
import subprocess
import sys
import time

import pytest

from editgrpo.config import GRPOConfig, validate_config
from viva_base.errors import UserError
from viva_base.recipe import load_recipe


def _run_train(repo_root, tmp_path, *overrides):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "editgrpo.train", "recipe=recipes/tiny.yaml",
                           f"output_dir={tmp_path / 'run'}", *overrides],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
    return proc, time.time() - t0


def test_unknown_reward_is_one_line_exit_2_before_any_work(repo_root, tmp_path):
    proc, seconds = _run_train(repo_root, tmp_path, "rewards.no_such_reward.weight=1")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "no_such_reward" in errors[0]
    for builtin in ("clip_if", "clip_sp", "pickscore", "hps", "vlm_judge", "pixel_sp", "toy_oracle"):
        assert builtin in errors[0]
    assert not (tmp_path / "run" / "data").exists()  # no toy prompts were built
    assert seconds < 10, seconds


@pytest.mark.parametrize("override, key", [
    ("rewards.clip_if.bogus_arg=1", "bogus_arg"),
    ("rewards.clip_if.weight=abc", "weight"),
    ("rewards.clip_if.text=instruction", "clip_if has no text option"),
    ("rewards.pickscore={weight: 1, text: caption}", "text one of target_caption, instruction"),
    ("rewards.clip_dir={weight: 1, text: target_caption}", "text one of captions, instruction"),
    ("train.scale_rewards=bogus", "train.scale_rewards"),
    ("train.lr_scheduler=cosine_warm", "train.lr_scheduler"),
    ("sampling.method=ddim", "sampling.method"),
    ("train.epsilon=2", "train.epsilon"),
    ("sampling.sde_window_size=9", "sampling.sde_window_size"),
    ("sampling.guidance_interval=[0.9,0.1]", "sampling.guidance_interval"),
    ("sampling.guidance_interval=[0.5]", "sampling.guidance_interval"),
    ("eval.guidance_interval=[-1,1]", "eval.guidance_interval"),
    ("eval.shift=0", "eval.shift"),
    ("model.tiny_kind=foo", "model.tiny_kind"),  # once only when the editor was built, after the data
])
def test_cheap_checks_name_the_key(override, key):
    cfg = load_recipe(GRPOConfig, ["recipe=recipes/tiny.yaml", override])
    with pytest.raises(UserError, match=key):
        validate_config(cfg)


@pytest.mark.parametrize("recipe", ["tiny", "toy", "viva", "lucy_grpo", "lucy_tiny"])
def test_shipped_recipes_pass_the_checks(recipe):
    validate_config(load_recipe(GRPOConfig, [f"recipe=recipes/{recipe}.yaml"]))


@pytest.mark.parametrize("override, key", [
    ("toy.open_place=1.5", "toy.open_place"),
    ("toy.grpo_types=[paint]", "toy.grpo_types"),
    ("toy.eval_simple_types=[]", "toy.eval_simple_types"),
    ("toy.sft_noop_clause=1.5", "toy.sft_noop_clause"),
])
def test_toy_chain_open_edit_checks_name_the_key(override, key):
    cfg = load_recipe(GRPOConfig, ["recipe=recipes/toy.yaml", override])
    with pytest.raises(UserError, match=key):
        validate_config(cfg)
    validate_config(load_recipe(GRPOConfig, ["recipe=recipes/toy.yaml", "toy.open_place=0.5", "toy.grpo_types=[add]"]))


@pytest.mark.parametrize("override, words", [
    ("toy.sft_overrides=[train.compile=fast]", ["toy.sft_overrides", "train.compile='fast'", "full, regional"]),
    ("toy.sft_overrides=[train.learnig_rate=1]", ["toy.sft_overrides", "train.learnig_rate", "train.learning_rate"]),
    ("toy.sft_overrides=[train.batch_size=0]", ["toy.sft_overrides", "train.batch_size=0"]),
    ("toy.sft_recipe=recipes/no_such.yaml", ["toy.sft_recipe", "no such file"]),
])
def test_the_toy_chains_sft_stage_recipe_is_checked_before_any_stage(repo_root, tmp_path, override, words):
    """A wrong SFT override used to fail after the data, toy CLIP and instructor stages (minutes on 2 cores); now the
    chain checks its SFT stage's recipe with the GRPO recipe: one line, exit 2, nothing built."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "editgrpo.train", "recipe=recipes/toy.yaml",
                           f"output_dir={tmp_path / 'run'}", override],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and all(w in errors[0] for w in words), errors
    assert not (tmp_path / "run" / "data").exists()
    assert time.time() - t0 < 10
