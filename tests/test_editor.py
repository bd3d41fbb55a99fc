"""The VIVA editor: shapes, masking, widening, reference path, save/load, loading errors."""
import json

import pytest
import torch

from viva_base.errors import CheckpointError
from viva_base.model import VivaEditor, widen_patch_embedding
from viva_base.tiny import TinySpec, make_tiny_editor, make_tiny_t2v_checkpoint, make_tiny_transformer

INSTR = ["remove the red square", "make the background night and add a small blue circle"]


def _inputs(b=2, f=5, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, f, 3, size, size, generator=g)


def test_forward_shapes_and_pixel_vae_roundtrip(tiny_editor):
    video = _inputs()
    cond, uncond = tiny_editor.encode_condition(video, INSTR)
    assert cond["source_latents"].shape == (2, 12, 5, 16, 16)
    assert cond["prompt_embeds"].shape[0] == 2 and cond["prompt_embeds"].shape[2] == 64
    assert uncond["prompt_embeds"].shape[0] == 2
    # valid tokens come first (right padding), and the longer instruction has more of them
    m = cond["prompt_mask"]
    assert torch.equal(m, torch.sort(m, dim=1, descending=True).values)
    assert m[1].sum() > m[0].sum()
    z = torch.randn(2, *tiny_editor.latent_shape(cond))
    v = tiny_editor.velocity(z, torch.tensor([0.3, 0.9]), cond)
    assert v.shape == z.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    # the toy "VAE" is exact
    assert torch.allclose(tiny_editor.decode(tiny_editor.encode_video(video)), video, atol=1e-6)


def test_padded_text_positions_do_not_change_velocity(tiny_editor):
    video = _inputs()
    cond, _ = tiny_editor.encode_condition(video, INSTR)
    assert (cond["prompt_mask"] == 0).any(), "need a padded row for this test"
    z = torch.randn(2, *tiny_editor.latent_shape(cond))
    sigma = torch.tensor([0.5, 0.5])
    v = tiny_editor.velocity(z, sigma, cond)
    garbage = dict(cond)
    pad = (cond["prompt_mask"] == 0).unsqueeze(-1)
    garbage["prompt_embeds"] = torch.where(pad, 1e3 * torch.randn_like(cond["prompt_embeds"]), cond["prompt_embeds"])
    from viva_base.policy import Condition

    v2 = tiny_editor.velocity(z, sigma, Condition(garbage))
    assert torch.equal(v, v2)


def test_velocity_does_not_depend_on_batch_composition(tiny_editor):
    video = _inputs()
    cond, _ = tiny_editor.encode_condition(video, INSTR)
    cond1, _ = tiny_editor.encode_condition(video[1:], INSTR[1:])
    z = torch.randn(2, *tiny_editor.latent_shape(cond))
    v = tiny_editor.velocity(z, torch.tensor([0.2, 0.7]), cond)
    v1 = tiny_editor.velocity(z[1:], torch.tensor([0.7]), cond1)
    assert torch.allclose(v[1:], v1, atol=1e-5)


def test_conditions_run_each_frozen_encoder_once(tiny_editor):
    before = dict(tiny_editor.calls)
    tiny_editor.encode_condition(_inputs(b=3), ["a", "b", "c"], [None, torch.rand(3, 20, 24), None])
    assert {k: tiny_editor.calls[k] - before[k] for k in before} == {"instructor": 3, "vae_encode": 3, "text_encoder_2": 3}


def test_reference_image_enters_the_dit(tiny_editor):
    video = _inputs()
    ref = torch.rand(3, 24, 40)
    cond_ref, _ = tiny_editor.encode_condition(video, INSTR, [ref, ref])
    cond_no, _ = tiny_editor.encode_condition(video, INSTR)
    assert cond_ref["has_ref"].all() and not cond_no["has_ref"].any()
    # the VLM saw one more image: more tokens
    assert cond_ref["prompt_mask"].sum() > cond_no["prompt_mask"].sum()
    z = torch.randn(2, *tiny_editor.latent_shape(cond_ref))
    s = torch.tensor([0.6, 0.6])
    v_ref = tiny_editor.velocity(z, s, cond_ref)
    assert v_ref.shape == z.shape
    assert not torch.allclose(v_ref, tiny_editor.velocity(z, s, cond_no))
    # the reference latent frame matters on its own (same VLM tokens, different latent frame)
    from viva_base.policy import Condition

    other = dict(cond_ref)
    other["ref_latents"] = torch.zeros_like(cond_ref["ref_latents"])
    assert not torch.allclose(v_ref, tiny_editor.velocity(z, s, Condition(other)))
    # a batch mixing items with and without reference equals the items run apart
    mixed, _ = tiny_editor.encode_condition(video, INSTR, [ref, None])
    v_mixed = tiny_editor.velocity(z, s, mixed)
    assert torch.allclose(v_mixed[:1], tiny_editor.velocity(z[:1], s[:1], mixed.select([0])), atol=1e-6)
    assert torch.allclose(v_mixed[1:], tiny_editor.velocity(z[1:], s[1:], mixed.select([1])), atol=1e-6)


def test_widened_dit_reproduces_t2v_output():
    spec = TinySpec()
    t2v = make_tiny_transformer(spec, seed=3).eval()
    wide = widen_patch_embedding(t2v).eval()
    assert wide.config.in_channels == 24 and wide.config.out_channels == 12
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 12, 3, 8, 8, generator=g)
    kw = dict(timestep=torch.tensor([500.0, 250.0]), encoder_hidden_states=torch.randn(2, 7, 64, generator=g),
              encoder_attention_mask=torch.tensor([[1] * 7, [1] * 4 + [0] * 3]),
              pooled_projections=torch.randn(2, 32, generator=g), return_dict=False)
    with torch.no_grad():
        ref = t2v(z, **kw)[0]
        for src in (torch.zeros_like(z), torch.randn(z.shape, generator=g)):  # the source half starts at zero
            out = wide(torch.cat([z, src], dim=1), **kw)[0]
            assert (out - ref).abs().max() < 1e-6


def test_save_and_load_give_identical_outputs(tiny_editor, tmp_path):
    video = _inputs()
    refs = [torch.rand(3, 32, 32), None]
    cond, uncond = tiny_editor.encode_condition(video, INSTR, refs)
    z = torch.randn(2, *tiny_editor.latent_shape(cond))
    s = torch.tensor([0.4, 0.8])
    v = tiny_editor.velocity(z, s, cond)
    tiny_editor.save_pretrained(tmp_path / "editor")
    assert {p.name for p in (tmp_path / "editor").iterdir()} >= {"transformer", "vae", "instructor", "text_encoder_2",
                                                                  "tokenizer_2", "scheduler", "editor_config.json"}
    loaded = VivaEditor.from_pretrained(tmp_path / "editor")
    cond2, uncond2 = loaded.encode_condition(video, INSTR, refs)
    for k in cond:
        assert torch.equal(cond[k], cond2[k]), k
        assert torch.equal(uncond[k], uncond2[k]), k
    assert torch.equal(v, loaded.velocity(z, s, cond2))


def test_from_t2v_layout_loads_and_widens(tmp_path):
    """The hub layouts the README starts from. The LLaVA folder, like xtuner's, has no processor_config.json, so its
    processor has no patch_size: transformers 5 then failed at the first instruction (`int // NoneType`)."""
    root = make_tiny_t2v_checkpoint(tmp_path / "hub")
    assert not (root / "instructor" / "processor_config.json").exists()
    editor = VivaEditor.from_t2v(root / "base", root / "instructor")
    ours = make_tiny_editor().processor  # the processor the tiny instructor was made with
    assert (editor.processor.patch_size, editor.processor.vision_feature_select_strategy,
            editor.processor.num_additional_image_tokens) == (ours.patch_size, ours.vision_feature_select_strategy,
                                                                ours.num_additional_image_tokens)
    editor.save_pretrained(tmp_path / "editor")  # the editor folder then carries a complete processor
    saved = json.loads((tmp_path / "editor" / "instructor" / "processor_config.json").read_text())
    assert saved["patch_size"] == ours.patch_size
    assert editor.transformer.config.in_channels == 2 * editor.transformer.config.out_channels
    from diffusers import HunyuanVideoTransformer3DModel

    t2v = HunyuanVideoTransformer3DModel.from_pretrained(root / "base" / "transformer")
    video = _inputs(b=1)
    cond, _ = editor.encode_condition(video, INSTR[:1])
    z = torch.randn(1, *editor.latent_shape(cond))
    with torch.no_grad():
        ref = t2v(z, timestep=torch.tensor([300.0]), encoder_hidden_states=cond["prompt_embeds"],
                  encoder_attention_mask=cond["prompt_mask"], pooled_projections=cond["pooled"], return_dict=False)[0]
    assert (editor.velocity(z, torch.tensor([0.3]), cond) - ref).abs().max() < 1e-6


def test_tiny_hunyuan_vae_path():
    from viva_base.tiny import make_tiny_editor

    editor = make_tiny_editor(TinySpec(vae="hunyuan", latent_channels=4))
    assert editor.valid_num_frames(10) == 9
    video = _inputs(b=1, f=9, size=32)
    cond, _ = editor.encode_condition(video, INSTR[:1])
    assert cond["source_latents"].shape == (1, 4, 3, 4, 4)
    z = torch.randn(1, *editor.latent_shape(cond))
    assert editor.velocity(z, torch.tensor([0.5]), cond).shape == z.shape
    assert editor.decode(z).shape == (1, 9, 3, 32, 32)


def test_loading_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        VivaEditor.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="missing editor_config.json"):
        VivaEditor.from_pretrained(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="could not be fetched|not a valid"):
        VivaEditor.from_pretrained("someone/not-a-real-editor-xyz")


def test_pooled_text_vector_sees_the_whole_instruction(tiny_editor):
    """The tiny CLIP text encoder pools at the end token, as real CLIP checkpoints do. Before the fix its </s> had
    id 2, transformers took the legacy ``argmax(input_ids)`` path and pooled at the highest-id word: the pooled vector
    of "make the red diamond green" and "make the red diamond blue" was identical (the target colour never reached
    the DiT's AdaLN conditioning)."""
    from viva_base.instructor import encode_pooled

    ed = tiny_editor
    texts = ["make the red diamond green", "make the red diamond blue", "make the green diamond red"]
    p = encode_pooled(ed.text_encoder_2, ed.tokenizer_2, texts, ed.config.pooled_max_length)
    ids = ed.tokenizer_2(texts[:1]).input_ids[0]
    assert ed.tokenizer_2.eos_token_id != 2 and ids[-1] == ed.tokenizer_2.eos_token_id
    # the pooled vector is CLIP's last hidden state (after the final LayerNorm) at the first </s>
    out = ed.text_encoder_2(input_ids=torch.tensor([ids]))
    assert torch.allclose(out.pooler_output[0], out.last_hidden_state[0, len(ids) - 1], atol=1e-6)
    rel = lambda a, b: float((a - b).norm() / a.norm())
    assert rel(p[0], p[1]) > 0.05   # the last word (target colour) changes it
    assert rel(p[0], p[2]) > 0.02   # word order changes it (causal attention)


def test_tiny_spec_chooses_the_instructor_layer_the_dit_reads():
    """TinySpec.instructor_hidden_layer reaches InstructorConfig.hidden_layer: with -1 the DiT's text tokens are the
    LLaVA's last hidden states (after its final norm), with the default -3 the first layer's output."""
    from viva_base.instructor import encode_instructions
    from viva_base.tiny import TinySpec, make_tiny_editor

    ed = make_tiny_editor(TinySpec(instructor_hidden_layer=-1), seed=0)
    assert ed.config.instructor.hidden_layer == -1 and make_tiny_editor(seed=0).config.instructor.hidden_layer == -3
    img = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    h_last, m = encode_instructions(ed.instructor, ed.processor, ["make the red diamond green"], [[img]],
                                    ed.config.instructor)
    ed.config.instructor.hidden_layer = -3
    h_first, _ = encode_instructions(ed.instructor, ed.processor, ["make the red diamond green"], [[img]],
                                     ed.config.instructor)
    assert h_last.shape == h_first.shape and not torch.allclose(h_last, h_first)
    # the last hidden states are RMS-normalised per token (LLaMA's final norm, unit weight at init)
    rms = h_last[0][m[0].bool()].pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=5e-3)  # up to the norm's eps


def test_tiny_spec_patch_size_sets_the_pixels_a_dit_token_covers():
    """TinySpec.patch_size reaches the DiT: patch 1 makes tokens of 2 x 2 pixels (pixel VAE x2), four times as many
    as the default patch 2, and the editor still predicts a velocity of the latent's shape."""
    from viva_base.tiny import TinySpec, make_tiny_editor

    fine, default = make_tiny_editor(TinySpec(patch_size=1), seed=0), make_tiny_editor(seed=0)
    assert (fine.transformer.config.patch_size, fine.spatial_ratio) == (1, 2)
    assert (default.transformer.config.patch_size, default.spatial_ratio) == (2, 4)
    video = torch.rand(1, 1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cond, _ = fine.encode_condition(video, ["make the red diamond green"])
    z = torch.randn(1, *fine.latent_shape(cond), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        v = fine.velocity(z, torch.tensor([0.5]), cond)
    assert v.shape == z.shape == (1, 12, 1, 16, 16)


def test_the_instructor_sees_the_whole_of_a_wide_frame(tiny_editor):
    """A wide first frame (32 x 64): the tiny image processor resizes its short side to 32 and centre-crops 32 x 32,
    so the outer quarters never reached the VLM (a real 16:9 frame loses 44% of its width the same way). Padded to a
    square first (the default, as LLaVA-1.5 and xtuner's LLaVA-Llama-3 were trained) they do; a square frame is the
    same either way, so the toy world (square clips) is unchanged."""
    from dataclasses import replace

    from viva_base.instructor import encode_instructions

    ed = tiny_editor
    g = torch.Generator().manual_seed(0)
    wide = torch.rand(3, 32, 64, generator=g)
    other = wide.clone()
    other[:, :, :8] = 1 - other[:, :, :8]  # only the left eighth differs

    def hidden(image, aspect):
        cfg = replace(ed.config.instructor, image_aspect=aspect)
        return encode_instructions(ed.instructor, ed.processor, ["make it blue"], [[image]], cfg)[0]

    assert ed.config.instructor.image_aspect == "pad"
    assert torch.equal(hidden(wide, "crop"), hidden(other, "crop"))        # the left edge is cut away
    assert not torch.allclose(hidden(wide, "pad"), hidden(other, "pad"))   # ... and seen when padded
    square = wide[:, :, :32]
    assert torch.equal(hidden(square, "pad"), hidden(square, "crop"))
    with pytest.raises(ValueError, match="image_aspect='stretch'"):
        replace(ed.config.instructor, image_aspect="stretch")


def test_the_instruction_is_never_cut_away_by_the_image_tokens(tiny_editor):
    """A real LLaVA gives 576 tokens per image, more than max_sequence_length (256): capping the whole sequence kept
    the first frame's tokens and cut every instruction away, so all prompts gave the DiT the same condition. Here the
    same ratio at tiny size: 16 image tokens, a cap of 10. The cap now applies to the instruction's tokens only."""
    from dataclasses import replace

    from viva_base.instructor import encode_instructions

    ed = tiny_editor
    frame = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    cfg = replace(ed.config.instructor, max_sequence_length=10)
    image_tokens = 16  # (32 / patch 8)^2 + the class token - 1 ("default" feature strategy)

    def encode(text, images=1):
        return encode_instructions(ed.instructor, ed.processor, [text], [[frame] * images], cfg)

    (a, ma), (b, mb) = encode("make the sky night"), encode("remove the red square")
    k = min(ma.shape[1], mb.shape[1])
    assert k > image_tokens  # before: both cut to their first 10 image tokens, identical
    assert not torch.allclose(a[:, image_tokens:k], b[:, image_tokens:k])  # the instructions reach the DiT
    long = " ".join(["blue"] * 40)
    h, m = encode(f"make it {long}", images=2)  # with a reference: both images' tokens stay, the text is cut to 10
    assert m.shape[1] == 2 * image_tokens + 10 and int(m.sum()) == 2 * image_tokens + 10
    # the cap itself: per row, its image tokens plus max_text others, valid tokens first
    from viva_base.instructor import cap_text_tokens

    mask = torch.tensor([[1] * 8 + [0] * 2, [1] * 10])
    assert cap_text_tokens(mask, torch.tensor([2, 5]), 3).tolist() == [[1] * 5 + [0] * 5, [1] * 8 + [0] * 2]
