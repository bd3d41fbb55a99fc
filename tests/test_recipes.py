"""Every shipped recipe loads through its schema (typos in recipes fail here, not on a GPU cluster)."""
from pathlib import Path

import pytest

from editgrpo.config import GRPOConfig
from viva_base.recipe import load_recipe
from viva_base.sft import SFTConfig

ROOT = Path(__file__).resolve().parents[1] / "recipes"
SFT = ["sft_tiny.yaml", "sft_toy.yaml", "sft_viva.yaml"]
GRPO = ["tiny.yaml", "toy.yaml", "viva.yaml", "lucy_tiny.yaml", "lucy_grpo.yaml"]


@pytest.mark.parametrize("name", SFT)
def test_sft_recipes_load(name):
    cfg = load_recipe(SFTConfig, [f"recipe={ROOT / name}"])
    assert cfg.train.max_steps > 0 and cfg.output_dir


@pytest.mark.parametrize("name", GRPO)
def test_grpo_recipes_load(name):
    cfg = load_recipe(GRPOConfig, [f"recipe={ROOT / name}"])
    assert cfg.train.num_generations >= 2 and len(cfg.rewards) >= 1


def test_paper_settings_in_the_13b_recipe():
    cfg = load_recipe(GRPOConfig, [f"recipe={ROOT / 'viva.yaml'}"])
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.init) == (64, 128, "gaussian")
    assert cfg.sampling.guidance_scale == 2.0
    sft = load_recipe(SFTConfig, [f"recipe={ROOT / 'sft_viva.yaml'}"])
    assert (sft.train.learning_rate, sft.train.batch_size, sft.train.max_steps, sft.data.p_video) == (2e-5, 128, 12000, 0.4)


def test_data_build_makes_clips_at_the_size_the_viva_recipes_train_at(repo_root):
    """The pairs pipeline's output size is the SFT / GRPO training size: a different one (480x832 vs 480x848 before)
    would be stretched by the trainers' resize (viva_base/data/pairs.py)."""
    from omegaconf import OmegaConf

    from viva_base.data.build.cli import ClipConfig

    build = OmegaConf.load(f"{repo_root}/recipes/data_build.yaml").clip.size
    assert list(build) == ClipConfig().size
    for name in ("sft_viva.yaml", "viva.yaml"):
        assert list(OmegaConf.load(f"{repo_root}/recipes/{name}").data.size) == list(build), name


def test_the_13b_sft_is_launched_with_the_deepspeed_config_that_fits(repo_root):
    """Every command that runs recipes/sft_viva.yaml (README, the recipe, docs) uses ZeRO-3: plain DDP full
    fine-tuning of the 13B DiT needs ~232 GB per GPU and ZeRO-2 ~75 GB (docs/scaling.md, "SFT")."""
    root = Path(repo_root)
    files = [root / "README.md", ROOT / "sft_viva.yaml", *sorted((root / "docs").glob("*.md"))]
    launches = [(f.name, ln) for f in files for ln in f.read_text().splitlines()
                if "viva_base.sft" in ln and "sft_viva.yaml" in ln]
    assert {"README.md", "sft_viva.yaml", "scaling.md"} <= {name for name, _ in launches}
    bad = [(name, ln) for name, ln in launches if "--config_file recipes/accelerate/zero3.yaml" not in ln]
    assert not bad, bad
