"""Recipe loading: YAML + key=value overrides, typed; clear errors naming the key."""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from omegaconf import OmegaConf

from viva_base.recipe import RecipeError, load_recipe, save_resolved


@dataclass
class Inner:
    learning_rate: float = 1e-4
    steps: int = 10


@dataclass
class Schema:
    output_dir: str = "out"
    api_key: Optional[str] = None
    train: Inner = field(default_factory=Inner)


def test_yaml_then_overrides(tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text("train:\n  steps: 20\n")
    cfg = load_recipe(Schema, [f"recipe={rec}", "train.learning_rate=0.5"])
    assert cfg.train.steps == 20 and cfg.train.learning_rate == 0.5 and cfg.output_dir == "out"


def test_unknown_key_names_closest(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown recipe key 'train.learnin_rate'.*did you mean 'train.learning_rate'"):
        load_recipe(Schema, ["train.learnin_rate=1"])
    rec = tmp_path / "r.yaml"
    rec.write_text("trian:\n  steps: 2\n")
    with pytest.raises(RecipeError, match=r"unknown recipe key 'trian'.*did you mean 'train'"):
        load_recipe(Schema, [f"recipe={rec}"])


def test_bad_type_and_missing_file():
    with pytest.raises(RecipeError, match=r"bad value for recipe key 'train.steps'"):
        load_recipe(Schema, ["train.steps=many"])
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(Schema, ["recipe=/nonexistent.yaml"])
    with pytest.raises(RecipeError, match="not key=value"):
        load_recipe(Schema, ["train.steps"])


def test_saved_config_redacts_secrets(tmp_path):
    cfg = load_recipe(Schema, ["api_key=sk-secret-123"])
    text = save_resolved(cfg, tmp_path).read_text()
    assert "sk-secret-123" not in text and "learning_rate" in text


def test_help_lists_every_recipe_key_with_type_default_and_doc(capsys, repo_root, monkeypatch):
    from editgrpo.config import GRPOConfig
    from editgrpo.train import main as grpo_main
    from viva_base.recipe import run_cli
    from viva_base.sft import SFTConfig
    from viva_base.sft import main as sft_main

    monkeypatch.chdir(repo_root)
    assert run_cli(grpo_main, GRPOConfig, ["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Edit-GRPO: post-train an edit policy")
    assert "  train.learning_rate" in out and "float  = 0.0001" in out
    assert "clip range of the ratio" in out  # the field's comment is its doc line
    assert run_cli(grpo_main, GRPOConfig, ["--help", "recipe=recipes/tiny.yaml"]) == 0
    out = capsys.readouterr().out
    assert "resolved from recipe=recipes/tiny.yaml" in out
    assert [ln for ln in out.splitlines() if ln.strip().startswith("train.num_iterations ")][0].endswith("int  = 6")
    assert run_cli(sft_main, SFTConfig, ["--recipe", "recipes/sft_tiny.yaml", "-h"]) == 0
    assert "train.w_m" in capsys.readouterr().out
    assert run_cli(sft_main, SFTConfig, ["--help", "train.no_such=1"]) == 2
    assert "unknown recipe key 'train.no_such'" in capsys.readouterr().err


def test_recipe_path_spellings(repo_root, monkeypatch):
    from viva_base.recipe import RecipeError, parse_args

    for argv in (["recipe=a.yaml", "x=1"], ["--recipe=a.yaml", "x=1"], ["--recipe", "a.yaml", "x=1"], ["x=1", "--config", "a.yaml"]):
        assert parse_args(argv) == ("a.yaml", ["x=1"]), argv
    with pytest.raises(RecipeError, match="needs a path"):
        parse_args(["--recipe"])


def test_train_help_from_the_command_line(repo_root):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "editgrpo.train", "--help"], cwd=repo_root, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "sampling.num_steps" in out.stdout and not out.stderr.strip().startswith("Traceback")


def test_deprecated_key_spellings_move_to_the_current_key(tmp_path, repo_root, monkeypatch, caplog):
    """One name per knob: SFT's LoRA block is top-level `lora.*` as in Edit-GRPO; the old `train.lora.*` still
    works (YAML and key=value) with a deprecation warning."""
    from viva_base.sft import SFTConfig

    monkeypatch.chdir(repo_root)
    old = tmp_path / "old.yaml"
    old.write_text("train:\n  trainable: lora\n  lora:\n    rank: 8\n    alpha: 16\n")
    with caplog.at_level("WARNING"):
        cfg = load_recipe(SFTConfig, [f"recipe={old}", "train.lora.init=default"])
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.init, cfg.train.trainable) == (8, 16, "default", "lora")
    assert "deprecated spelling of 'lora'" in caplog.text
    new = load_recipe(SFTConfig, ["recipe=recipes/sft_tiny.yaml", "lora.rank=8", "lora.alpha=16"])
    assert (new.lora.rank, new.lora.alpha) == (8, 16)
    with pytest.raises(RecipeError, match="unknown recipe key 'train.lora_rank'"):
        load_recipe(SFTConfig, ["train.lora_rank=8"])


def test_sizes_may_be_written_wxh_as_on_the_command_lines(tmp_path, repo_root, monkeypatch):
    from editgrpo.config import GRPOConfig
    from viva_base.recipe import size_hw
    from viva_base.sft import SFTConfig

    assert size_hw("848x480") == [480, 848] and size_hw([480, 848]) == [480, 848] and size_hw(32) == 32
    monkeypatch.chdir(repo_root)
    assert list(load_recipe(SFTConfig, ["data.size=848x480"]).data.size) == [480, 848]
    assert list(load_recipe(GRPOConfig, ["data.size=[480,848]"]).data.size) == [480, 848]
    y = tmp_path / "r.yaml"
    y.write_text("data:\n  size: 640x360\n")
    assert list(load_recipe(GRPOConfig, [f"recipe={y}"]).data.size) == [360, 640]
    with pytest.raises(RecipeError, match="data.size"):
        load_recipe(SFTConfig, ["data.size=big"])


def test_recipe_key_reference_page_matches_the_schemas(repo_root, monkeypatch):
    """docs/recipes.md is generated from the schemas; a schema change without regenerating it fails here."""
    from viva_base import recipe_docs
    from viva_base.recipe import recipe_rows

    monkeypatch.chdir(repo_root)
    assert recipe_docs.main(["--check"]) == 0, "run: python -m viva_base.recipe_docs"
    page = (Path(repo_root) / "docs" / "recipes.md").read_text()
    from viva_base.sft import SFTConfig

    for key, *_ in recipe_rows(SFTConfig):
        assert f"| `{key}` |" in page
    assert "`train.lora.*` -> `lora.*`" in page


def test_a_recipes_rewards_block_replaces_the_default_set(tmp_path):
    """OmegaConf merged a recipe's rewards with the schema's default (clip_if + clip_sp): a recipe naming only
    pixel_sp silently trained on three rewards. The block is now the whole set; overrides still add to it."""
    from editgrpo.config import GRPOConfig

    p = tmp_path / "r.yaml"
    p.write_text("rewards:\n  pixel_sp: {weight: 1.0}\n")
    cfg = load_recipe(GRPOConfig, [f"recipe={p}", "rewards.clip_dir.weight=0.5"])
    assert OmegaConf.to_container(cfg.rewards) == {"pixel_sp": {"weight": 1.0}, "clip_dir": {"weight": 0.5}}
    assert set(load_recipe(GRPOConfig, []).rewards) == {"clip_if", "clip_sp"}  # no block: the default
    q = tmp_path / "q.yaml"
    q.write_text("train:\n  seed: 3\n")
    assert set(load_recipe(GRPOConfig, [f"recipe={q}"]).rewards) == {"clip_if", "clip_sp"}
