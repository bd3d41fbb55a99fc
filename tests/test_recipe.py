"""Recipe loading: YAML + key=value overrides, typed; clear errors naming the key."""
from dataclasses import dataclass, field
from typing import Optional

import pytest

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
