"""The VAE's working memory is bounded (viva_base.vae.configure_vae_memory): a batch goes through the encoder and
decoder one clip at a time (rollouts decode a whole group at once: measured, the decoding working set grows with
the batch), and with ``vae_tiling`` a large clip goes through in spatial tiles."""
from __future__ import annotations

import pytest
import torch

from viva_base.tiny import TinySpec, make_tiny_editor


def _spy(monkeypatch, vae, name: str) -> list:
    calls = []
    original = getattr(vae, name)

    def spy(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return original(x, *args, **kwargs)

    monkeypatch.setattr(vae, name, spy)
    return calls


def test_the_editor_sends_a_batch_through_the_vae_one_clip_at_a_time(monkeypatch):
    editor = make_tiny_editor(TinySpec(vae="hunyuan", latent_channels=4))
    videos = torch.rand(3, 5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    encodes = _spy(monkeypatch, editor.vae, "_encode")
    latents = editor.encode_video(videos)
    assert [s[0] for s in encodes] == [1, 1, 1]  # the diffusers VAE's batch entry point split it (slicing)
    decodes = _spy(monkeypatch, editor.vae, "_decode")
    pixels = editor.decode(latents)
    assert [s[0] for s in decodes] == [1, 1, 1]
    # the same numbers as each clip alone
    for i in range(3):
        assert torch.equal(editor.encode_video(videos[i:i + 1]), latents[i:i + 1])
        assert torch.equal(editor.decode(latents[i:i + 1]), pixels[i:i + 1])


def test_vae_tiling_is_the_editors_setting_saved_with_it_and_a_recipe_key(tmp_path, monkeypatch):
    from viva_base.errors import UserError
    from viva_base.model import VivaEditor
    from viva_base.training import ModelConfig, build_editor

    editor = make_tiny_editor(TinySpec(vae="hunyuan", latent_channels=4))
    assert editor.config.vae_tiling and editor.vae.use_tiling and editor.vae.use_slicing
    # a clip larger than a tile (256 px) decodes through the tiles; with tiling off it does not
    latents = torch.randn(1, 4, 1, 36, 36, generator=torch.Generator().manual_seed(1))  # 288 x 288 pixels
    tiled = _spy(monkeypatch, editor.vae, "tiled_decode")
    editor.decode(latents)
    assert len(tiled) == 1
    editor.save_pretrained(tmp_path / "ed")
    assert VivaEditor.from_pretrained(tmp_path / "ed").vae.use_tiling
    off = VivaEditor.from_pretrained(tmp_path / "ed", vae_tiling=False)
    assert not off.vae.use_tiling and off.vae.use_slicing
    off.save_pretrained(tmp_path / "off")
    assert not VivaEditor.from_pretrained(tmp_path / "off").vae.use_tiling
    # model.vae_tiling overrides the editor's setting
    built = build_editor(ModelConfig(pretrained=str(tmp_path / "ed"), vae_tiling=False))
    assert not built.config.vae_tiling and not built.vae.use_tiling
    assert build_editor(ModelConfig(pretrained=str(tmp_path / "off"), vae_tiling=True)).vae.use_tiling
    # the toy's pixel VAE has nothing to tile or slice; the editor builds and runs as before
    toy = make_tiny_editor()
    assert toy.decode(toy.encode_video(torch.rand(2, 1, 3, 32, 32))).shape == (2, 1, 3, 32, 32)
    # Lucy-Edit's Wan VAE: slicing, and model.vae_tiling is refused in one line
    from viva_base.tiny_lucy import make_tiny_lucy_checkpoint

    lucy = make_tiny_lucy_checkpoint(tmp_path / "lucy")
    assert build_editor(ModelConfig(pretrained=str(lucy))).vae.use_slicing
    with pytest.raises(UserError, match=r"model.vae_tiling: the LucyEditor's VAE is not tiled"):
        build_editor(ModelConfig(pretrained=str(lucy), vae_tiling=True))


def test_a_checkpoint_written_before_a_new_none_key_still_resumes(tmp_path, repo_root, monkeypatch):
    """A key the schema added later at its default None (``model.vae_tiling``) is absent from older checkpoints'
    stored recipe: that is not a different recipe. Any other difference still is."""
    from test_resume_free import _checkpoint, _sft_cfg

    from viva_base.errors import UserError
    from viva_base.training import check_resume_config, resume_config

    monkeypatch.chdir(repo_root)
    old = {k: v for k, v in resume_config(_sft_cfg()).items() if k != "model.vae_tiling"}
    ckpt = _checkpoint(tmp_path, old)
    check_resume_config(ckpt, _sft_cfg())
    with pytest.raises(UserError, match=r"model.vae_tiling: '<unset>' -> False"):
        check_resume_config(ckpt, _sft_cfg("model.vae_tiling=false"))


def test_the_scaling_document_states_the_vae_memory_and_the_check_that_measures_it(repo_root):
    from pathlib import Path

    from benchmarks.scaling import CHECKING, VAE_MEMORY

    text = (Path(repo_root) / "docs" / "scaling.md").read_text()
    assert VAE_MEMORY in text and CHECKING in text and "* `vae`:" in CHECKING
