"""Recipe keys a resumed run may change (``RESUME_FREE_KEYS``): checkpoints and the toy chain's cached SFT stage
written before a key became free (``train.compile``, ``train.fused_optimizer``) are still continued and reused."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from viva_base.errors import UserError
from viva_base.recipe import load_recipe
from viva_base.sft import SFTConfig
from viva_base.training import check_resume_config, resume_config, resume_free, save_checkpoint


def _sft_cfg(*overrides):
    return load_recipe(SFTConfig, ["recipe=recipes/sft_tiny.yaml", "output_dir=unused", *overrides])


def test_kernel_options_are_free_and_the_rest_is_not(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    for key in ("train.compile", "train.fused_optimizer", "train.max_steps", "data.precompute", "eval.every",
                "rewards.clip_if.server"):
        assert resume_free(key), key
    for key in ("train.learning_rate", "train.compiled", "rewards.clip_if.weight", "model.tiny"):
        assert not resume_free(key), key
    assert resume_config(_sft_cfg("train.compile=full")) == resume_config(_sft_cfg())


def _checkpoint(tmp_path, config: dict):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return save_checkpoint(tmp_path, 2, model=model, optimizer=opt, lr_scheduler=sched, state={"config": config})


def test_a_checkpoint_that_stored_a_now_free_key_resumes_with_any_value(tmp_path, repo_root, monkeypatch):
    """Checkpoints written before ``train.compile`` became free store it: resuming with it changed (or unset) is
    not a different recipe; a real difference still is, named in one line."""
    monkeypatch.chdir(repo_root)
    cfg = _sft_cfg()
    old = {**resume_config(cfg), "train.compile": "full", "train.fused_optimizer": True}  # as written before
    ckpt = _checkpoint(tmp_path, old)
    check_resume_config(ckpt, cfg)  # compile none now: continues
    check_resume_config(ckpt, _sft_cfg("train.compile=regional"))
    with pytest.raises(UserError, match=r"different recipe \(train.learning_rate"):
        check_resume_config(ckpt, _sft_cfg("train.learning_rate=0.123"))


def test_the_toy_chains_cached_sft_stage_survives_a_key_becoming_free(tmp_path, repo_root, monkeypatch):
    """``stage.json`` of an SFT stage written when ``train.compile`` was part of the recipe's identity still
    matches: the editor is reused (no SFT run) and the fingerprint is the file's, the one the Edit-GRPO
    checkpoints of that chain recorded, so they continue too. A changed learning rate is still a new stage."""
    from editgrpo import toy
    from editgrpo.config import ToyChainConfig

    monkeypatch.chdir(repo_root)
    runs = []

    def fake_sft(cfg):  # stands in for viva_base.sft.main: writes an editor folder
        runs.append(cfg)
        (tmp_path / "sft" / "final").mkdir(parents=True, exist_ok=True)
        (tmp_path / "sft" / "final" / "editor_config.json").write_text("{}")

    monkeypatch.setattr("viva_base.sft.main", fake_sft)
    t = OmegaConf.structured(ToyChainConfig)
    t.sft_recipe = "recipes/sft_tiny.yaml"
    fp = toy._sft_stage(t, tmp_path / "sft", "pairs.jsonl", "none")
    assert len(runs) == 1
    stage = tmp_path / "sft" / toy.SFT_STAGE
    assert "train.compile" not in json.loads(stage.read_text())
    assert toy._sft_stage(t, tmp_path / "sft", "pairs.jsonl", "none") == fp and len(runs) == 1
    written_before = {**json.loads(stage.read_text()), "train.compile": "full", "train.fused_optimizer": True}
    stage.write_text(json.dumps(written_before))
    assert toy._sft_stage(t, tmp_path / "sft", "pairs.jsonl", "none") == toy.stage_fingerprint(written_before)
    assert len(runs) == 1  # reused
    t.sft_overrides = ["train.learning_rate=0.123"]
    toy._sft_stage(t, tmp_path / "sft", "pairs.jsonl", "none")
    assert len(runs) == 2 and json.loads(stage.read_text())["train.learning_rate"] == 0.123
