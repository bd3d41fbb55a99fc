"""LucyEditor: an ODE edit with Edit-GRPO's sampler reproduces diffusers' LucyEditPipeline on a tiny checkpoint in
the published decart-ai/Lucy-Edit-Dev layout; latent normalisation, timesteps and prompt padding against
independent computations; per-prompt encoder calls; save/load (ours and diffusers'); the edit command."""
import json

import pytest
import torch

from editgrpo.rollout import guided_velocity, initial_noise, sample_generators
from editgrpo.sampling import sample_trajectory, sigma_schedule
from viva_base.errors import CheckpointError, UserError
from viva_base.lucy import LucyEditor, denormalize_latents, lucy_timesteps, normalize_latents, zero_padded_embeddings
from viva_base.policy import Condition, EditPolicy
from viva_base.tiny_lucy import make_tiny_lucy_checkpoint, make_tiny_lucy_editor
from viva_base.training import load_editor

INSTR = "make the sky night and remove the red square"


def _video(b=1, f=9, h=32, w=32, seed=0):
    return torch.rand(b, f, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint laid out as decart-ai/Lucy-Edit-Dev is: model_index.json, UniPC scheduler, no editor_config."""
    return make_tiny_lucy_checkpoint(tmp_path_factory.mktemp("lucy") / "Lucy-Edit-Tiny")


@pytest.fixture(scope="module")
def editor(checkpoint):
    return load_editor(checkpoint)


# ---------------------------------------------------------------------------------------------- equivalence
def test_ode_edit_reproduces_lucy_edit_pipeline(checkpoint, editor):
    """Same seed, same steps, same CFG: our sampler (sigma_schedule + ode_step + cfg_velocity over the policy's
    velocity) and the edit command's sampler give LucyEditPipeline's latents and frames to 1e-5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LucyEditPipeline

    from viva_base.pipeline import EditPipeline

    assert isinstance(editor, LucyEditor) and isinstance(editor, EditPolicy)
    assert not (checkpoint / "editor_config.json").exists()
    # what the published layout says: expand_timesteps in model_index.json, flow_shift in the UniPC config
    assert editor.config.expand_timesteps is True and editor.config.shift == 5.0
    assert editor.config.max_sequence_length == 512
    pipe = LucyEditPipeline.from_pretrained(checkpoint, scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    video = _video()
    steps, guidance, seed = 4, 3.0, 7
    kw = dict(video=video, prompt=INSTR, negative_prompt="", height=32, width=32, num_frames=9,
              num_inference_steps=steps, guidance_scale=guidance)
    ref_latents = pipe(**kw, generator=torch.Generator().manual_seed(seed), output_type="latent").frames
    ref_frames = pipe(**kw, generator=torch.Generator().manual_seed(seed), output_type="pt").frames

    cond, uncond = editor.encode_condition(video, [INSTR])
    z0 = initial_noise(editor.latent_shape(cond), sample_generators([seed]))
    ours = sample_trajectory(lambda z, s: guided_velocity(editor, z, s, cond, uncond, guidance), z0,
                             sigma_schedule(steps, editor.config.shift), mode="ode").latents
    assert ours.shape == ref_latents.shape == (1, 8, 3, 4, 4)
    assert (ours - ref_latents).abs().max() <= 1e-5
    frames = editor.decode(ours)
    assert frames.shape == ref_frames.shape == (1, 9, 3, 32, 32)
    assert (frames - ref_frames).abs().max() <= 1e-5
    # the edit command's sampler (scheduler.step) on the same clip
    cmd = EditPipeline(editor).sample(video[0], INSTR, num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                                      progress=False)
    assert (cmd - ref_frames[0]).abs().max() <= 1e-5
    # the comparison is sensitive: another negative prompt (the unconditional branch) moves the result by far more
    blurry = Condition({"prompt_embeds": editor.encode_prompt(["blurry"]), "source_latents": cond["source_latents"]})
    other = sample_trajectory(lambda z, s: guided_velocity(editor, z, s, cond, blurry, guidance), z0,
                              sigma_schedule(steps, editor.config.shift), mode="ode").latents
    assert (other - ref_latents).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- pure functions
def test_latent_normalisation_and_timesteps():
    z = torch.randn(2, 3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    mean, std = [0.5, -1.0, 2.0], [2.0, 0.5, 4.0]
    n = normalize_latents(z, mean, std)
    for c in range(3):  # (z - mean) / std, channel by channel
        assert torch.allclose(n[:, c], (z[:, c] - mean[c]) / std[c], atol=1e-6)
    assert torch.allclose(denormalize_latents(n, mean, std), z, atol=1e-6)
    sigma = torch.tensor([1.0, 0.25])
    assert torch.equal(lucy_timesteps(sigma, 1000, None), torch.tensor([1000.0, 250.0]))
    t = lucy_timesteps(sigma, 1000, 12)
    assert t.shape == (2, 12)
    assert torch.equal(t[0], torch.full((12,), 1000.0)) and torch.equal(t[1], torch.full((12,), 250.0))


def test_prompt_padding_matches_the_pipelines_trim_and_pad():
    hidden = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    # the pipeline: keep u[:len], then concatenate zeros up to the full length
    ref = torch.stack([torch.cat([u[:v], u.new_zeros(6 - v, 4)]) for u, v in zip(hidden, mask.sum(1))])
    assert torch.equal(zero_padded_embeddings(hidden, mask), ref)


# ---------------------------------------------------------------------------------------------- the interface
def test_conditions_once_per_prompt_and_velocity_batching(editor):
    calls = dict(editor.calls)
    video = _video(2, seed=3)
    cond, uncond = editor.encode_condition(video, [INSTR, "add a small blue circle"], [None, None])
    assert editor.calls["text_encoder"] - calls["text_encoder"] == 2  # instructions + negatives: one batched call
    assert editor.calls["vae_encode"] - calls["vae_encode"] == 2
    assert set(cond) == {"prompt_embeds", "source_latents"} and cond.batch_size == 2
    assert cond["prompt_embeds"].shape == (2, 512, 32)
    assert torch.equal(cond["source_latents"], uncond["source_latents"])
    assert torch.allclose(uncond["prompt_embeds"], editor.encode_prompt(["", ""]))  # uncond = the negative prompt
    n_tokens = (editor.tokenizer(INSTR).input_ids.__len__())
    assert cond["prompt_embeds"][0, n_tokens:].abs().max() == 0 and cond["prompt_embeds"][0, :n_tokens].abs().min() > 0
    # source latents: the VAE mode, normalised with the config's latents_mean / latents_std
    vae = editor.vae
    raw = vae.encode(video[1:].permute(0, 2, 1, 3, 4) * 2 - 1).latent_dist.mode()
    m = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    s = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    assert torch.allclose(cond["source_latents"][1:], (raw - m) / s, atol=1e-5)
    # a batch of (z, sigma) pairs gives each sample's velocity; a float sigma equals a [B] tensor
    z = torch.randn(2, *editor.latent_shape(cond), generator=torch.Generator().manual_seed(4))
    sigma = torch.tensor([0.9, 0.3])
    v = editor.velocity(z, sigma, cond)
    assert v.dtype == torch.float32 and v.shape == z.shape
    for i in range(2):
        assert torch.allclose(v[i:i + 1], editor.velocity(z[i:i + 1], sigma[i:i + 1], cond.select(i)), atol=1e-5)
    assert torch.equal(editor.velocity(z, 0.3, cond), editor.velocity(z, torch.tensor([0.3, 0.3]), cond))
    both = Condition.cat([cond, uncond])  # equal lengths: no padding changes what the DiT sees
    assert both["prompt_embeds"].shape == (4, 512, 32)


def test_input_rules(editor):
    assert editor.temporal_ratio == 4 and editor.spatial_ratio == 16 and editor.valid_num_frames(12) == 9
    with pytest.raises(UserError, match="no reference image"):
        editor.encode_condition(_video(), [INSTR], [torch.rand(3, 32, 32)])
    with pytest.raises(UserError, match="4k \\+ 1 frames"):
        editor.encode_video(_video(f=8))
    with pytest.raises(UserError, match="multiples of 16"):
        editor.encode_video(_video(h=24))


# ---------------------------------------------------------------------------------------------- save / load
def test_save_load_round_trip_and_diffusers_reads_our_directory(tmp_path):
    from diffusers import LucyEditPipeline

    ed = make_tiny_lucy_editor(seed=3, negative_prompt="low quality")
    path = ed.save_pretrained(tmp_path / "saved")
    meta = json.loads((path / "editor_config.json").read_text())
    assert meta["_class_name"] == "LucyEditor" and meta["negative_prompt"] == "low quality"
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == "LucyEditPipeline"
    back = load_editor(path)
    assert isinstance(back, LucyEditor) and back.config == ed.config
    video = _video(seed=5)
    c1, u1 = ed.encode_condition(video, [INSTR])
    c2, u2 = back.encode_condition(video, [INSTR])
    z = torch.randn(1, *ed.latent_shape(c1), generator=torch.Generator().manual_seed(6))
    assert torch.equal(ed.velocity(z, 0.5, c1), back.velocity(z, 0.5, c2))
    assert torch.equal(u1["prompt_embeds"], u2["prompt_embeds"])
    pipe = LucyEditPipeline.from_pretrained(path)  # our directory is a diffusers pipeline directory
    assert pipe.config.expand_timesteps is True and pipe.scheduler.config.shift == ed.config.shift
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]  # written atomically, no temp folder left


def test_load_errors_name_the_problem(checkpoint, tmp_path):
    import shutil

    two = tmp_path / "two_stage"
    shutil.copytree(checkpoint, two)
    index = json.loads((two / "model_index.json").read_text())
    (two / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": 0.9}))
    with pytest.raises(CheckpointError, match="two-stage"):
        load_editor(two)
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    with pytest.raises(CheckpointError, match="unknown editor class 'WanPipeline'"):
        load_editor(other)
    with pytest.raises(CheckpointError, match="not LucyEditPipeline"):
        LucyEditor.from_pretrained(other)
    (other / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match="missing editor_config.json"):
        load_editor(other)


# ---------------------------------------------------------------------------------------------- the edit command
def test_edit_command_with_a_lucy_directory_and_lora(checkpoint, editor, tmp_path, capsys):
    """``--model`` takes the published layout or our saved directory (the same edit), and a LoRA for the DiT."""
    from viva_base.edit import main
    from viva_base.peft_utils import add_lora, save_lora
    from viva_base.video import probe_video, read_video, write_video

    model = editor.save_pretrained(tmp_path / "lucy")
    lora_ed = make_tiny_lucy_editor()  # same architecture; an adapter with non-zero B changes the edit
    add_lora(lora_ed.transformer, rank=2, alpha=2, targets=lora_ed.lora_targets)
    with torch.no_grad():
        for n, p in lora_ed.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    save_lora(lora_ed.transformer, tmp_path / "lora")
    clip = _video(f=10, h=40, w=52, seed=8)[0]  # neither 4k+1 frames nor multiples of 16: the command adapts it
    src = write_video(tmp_path / "in.mp4", clip, fps=10)
    outs = {}
    # PNG folders where outputs are compared (lossless: H.264 turns a 1-level float-noise flip into larger changes)
    for name, where, extra in (("published", checkpoint, []), ("saved", model, []),
                               ("lora.mp4", model, ["--lora", tmp_path / "lora"])):
        out = tmp_path / name
        rc = main(["--model", str(where), "--video", str(src), "--instruction", INSTR, "--out", str(out),
                   "--steps", "2", "--seed", "1", "--device", "cpu", "--no-progress", *map(str, extra)])
        assert rc == 0
        outs[name] = read_video(out).frames
        assert outs[name].shape == (10, 3, 40, 52)
    assert probe_video(tmp_path / "lora.mp4") == (10, 40, 52, 10.0)  # the input's frame count, size and fps
    assert (outs["published"] - outs["saved"]).abs().max() <= 1 / 255
    assert (outs["saved"] - outs["lora.mp4"]).abs().max() > 0.1
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "ref.png")
    capsys.readouterr()
    rc = main(["--model", str(model), "--video", str(src), "--instruction", INSTR, "--out", str(tmp_path / "r.mp4"),
               "--reference", str(tmp_path / "ref.png"), "--steps", "1", "--device", "cpu", "--no-progress"])
    assert rc == 2 and not (tmp_path / "r.mp4").exists()
    assert "Lucy-Edit takes no reference image" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- recipes
def test_lucy_grpo_recipe_is_valid_and_its_model_settings_build(checkpoint):
    """recipes/lucy_grpo.yaml passes the schema, its clip fits Lucy's rules, and its model section (bf16, gradient
    checkpointing) builds a working editor when pointed at a Lucy-Edit-layout directory."""
    from pathlib import Path

    from editgrpo.config import GRPOConfig
    from viva_base.recipe import load_recipe
    from viva_base.training import build_editor

    root = Path(__file__).resolve().parent.parent
    cfg = load_recipe(GRPOConfig, [], recipe=str(root / "recipes" / "lucy_grpo.yaml"))
    assert cfg.model.pretrained == "decart-ai/Lucy-Edit-Dev" and cfg.model.gradient_checkpointing
    assert (cfg.data.frames - 1) % 4 == 0 and all(s % 32 == 0 for s in cfg.data.size)  # Wan VAE 4 / 16 x patch 2
    assert cfg.sampling.sde_window_range[1] + cfg.sampling.sde_window_size <= cfg.sampling.num_steps
    assert cfg.lora.targets is None  # the editor's own (Wan attn1/attn2 projections)
    cfg.model.pretrained = str(checkpoint)
    ed = build_editor(cfg.model, device="cpu")
    assert isinstance(ed, LucyEditor) and ed.transformer.is_gradient_checkpointing
    assert ed.dtype == torch.bfloat16 and ed.text_encoder.dtype == torch.bfloat16 and ed.vae.dtype == torch.float32
    cond, _ = ed.encode_condition(_video(), [INSTR], with_uncond=False)
    assert cond["prompt_embeds"].dtype == cond["source_latents"].dtype == torch.bfloat16
    v = ed.velocity(torch.randn(1, *ed.latent_shape(cond)), 0.5, cond)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
