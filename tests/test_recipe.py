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
