"""The edit pipeline: clip-adapting math, the sampler against an independent reference, round trips
through an exact "copy" policy, reproducibility, and the Hunyuan-VAE path (frames 4k+1, sides x16)."""
import copy
import dataclasses
from fractions import Fraction

import pytest
import torch

from viva_base.errors import UserError
from viva_base.pipeline import (VIDEO_OUTPUT_EXTENSIONS, EditPipeline, check_output_path, map_back, plan_clip,
                                read_stride, resample_indices, resize_frames)
from viva_base.video import VideoError, probe_video, read_video, write_video

INSTR = "make the background night"


def _clip(f=5, h=16, w=20, seed=0):
    return torch.rand(f, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- pure math
@pytest.mark.parametrize("n,h,w,r,m,max_f,max_s,frames,size,expected", [
    (9, 50, 70, 1, 4, 129, 720, None, None, (9, 48, 68)),         # pixel VAE x patch 2: sides to x4
    (10, 24, 40, 4, 16, 129, 720, None, None, (9, 16, 32)),       # Hunyuan: 4k+1 and x16, ties go down
    (12, 24, 40, 4, 16, 129, 720, None, None, (13, 16, 32)),      # 13 is nearer than 9
    (11, 24, 40, 4, 16, 129, 720, None, None, (9, 16, 32)),       # tie 9 / 13 goes down
    (300, 2160, 3840, 4, 16, 129, 720, None, None, (129, 400, 720)),  # long + 4K: capped, aspect kept
    (1, 10, 10, 4, 16, 129, 720, None, None, (1, 16, 16)),        # one small frame: at least one multiple
    (5, 100, 100, 1, 16, 129, 40, None, None, (5, 32, 32)),       # 40 -> 2.5 x 16, tie down
    (5, 1000, 1000, 1, 16, 129, 60, None, None, (5, 48, 48)),     # 60 rounds to 64 > max side: capped at 48
    (30, 24, 40, 4, 16, 129, 720, 20, "64x32", (21, 32, 64)),     # explicit frames / WxH
    (30, 24, 40, 4, 16, 9, 720, 20, (70, 50), (21, 48, 64)),      # explicit values override the caps
])
def test_plan_clip_table(n, h, w, r, m, max_f, max_s, frames, size, expected):
    assert plan_clip(n, h, w, temporal_ratio=r, spatial_multiple=m, max_frames=max_f, max_side=max_s,
                     frames=frames, size=size) == expected


def test_plan_clip_is_valid_nearest_and_capped():
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        n, h, w = (int(x) for x in torch.randint(1, 400, (3,), generator=g))
        r = [1, 4][int(torch.randint(2, (1,), generator=g))]
        m = [4, 16][int(torch.randint(2, (1,), generator=g))]
        max_f, max_s = 129, 120
        f, hh, ww = plan_clip(n, h, w, temporal_ratio=r, spatial_multiple=m, max_frames=max_f, max_side=max_s)
        assert (f - 1) % r == 0 and hh % m == 0 and ww % m == 0 and hh >= m and ww >= m
        assert f <= max_f and max(hh, ww) <= max_s
        if n <= max_f - r:
            assert abs(f - n) <= r / 2
        scale = min(1.0, max_s / max(h, w))
        for side, src in ((hh, h), (ww, w)):
            assert abs(side - src * scale) <= m / 2 or side == m or side == (max_s // m) * m


def test_resample_indices_are_nearest_and_span_the_clip():
    for n_from in range(1, 18):
        for n_to in range(1, 18):
            idx = resample_indices(n_from, n_to).tolist()
            assert len(idx) == n_to and all(0 <= j < n_from for j in idx)
            assert idx == sorted(idx)
            if n_to == 1:
                assert idx == [0]
                continue
            assert idx[0] == 0 and idx[-1] == n_from - 1
            for i, j in enumerate(idx):
                exact = Fraction(i * (n_from - 1), n_to - 1)
                assert abs(j - exact) <= Fraction(1, 2)
                if abs(j - exact) == Fraction(1, 2):
                    assert j > exact  # halves round up
            if n_from == n_to:
                assert idx == list(range(n_to))


def test_read_stride_bounds_decoding_and_keeps_sampled_frames():
    for n in range(1, 400, 7):
        for m in (1, 5, 9, 33, 129):
            k = read_stride(n, m)
            decoded = -(-n // k)
            if n >= m:
                assert decoded <= 2 * m - 1 or m == 1
            for s in resample_indices(n, m).tolist():  # the nearest decoded frame is at most k/2 away
                d = min((s + k // 2) // k, decoded - 1)
                assert abs(d * k - s) <= k / 2 or (d == decoded - 1 and 0 < s - d * k < k)


def test_map_back_is_identity_when_nothing_was_adapted():
    x = _clip()
    assert torch.equal(map_back(x, 5, (16, 20)), x)
    assert resize_frames(x, (16, 20)) is x


# ------------------------------------------------------------------------------------- policy doubles
class CopyPolicy:
    """The tiny editor, but with the exact velocity of a point mass at the source latents:
    ``v = (z - z_src) / sigma`` (the flow z_sigma = (1 - sigma) z_src + sigma noise). Euler steps are
    exact on straight lines, and the pixel VAE is exact, so the edit returns the (adapted) source."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def velocity(self, latents, sigma, cond):
        s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1, 1)
        return (latents.float() - cond["source_latents"].float()) / s


class Recorder:
    """Any policy, recording the clip it is asked to encode and what it decodes."""

    def __init__(self, inner):
        self.inner, self.encoded, self.decoded = inner, [], []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode_condition(self, videos, *args, **kwargs):
        self.encoded.append(tuple(videos.shape))
        return self.inner.encode_condition(videos, *args, **kwargs)

    def decode(self, latents):
        out = self.inner.decode(latents)
        self.decoded.append(tuple(out.shape))
        return out


def test_copy_policy_returns_a_model_sized_clip_unchanged(tiny_editor):
    x = _clip(f=5, h=16, w=20)
    out = EditPipeline(CopyPolicy(tiny_editor))(x, INSTR, num_inference_steps=4, progress=False)
    assert out.shape == x.shape and torch.allclose(out, x, atol=1e-5)


def test_copy_policy_maps_frames_back_to_the_nearest_edited_one(tiny_editor):
    """7 uniform-colour frames, 18x22, edited as 4 frames of 16x20: output frame i has the colour of
    source frame s(i) = round(round(i * 3/6) * 6/3) (two nearest-index maps), at 18x22."""
    n, model_f = 7, 4
    colours = torch.rand(n, 3, generator=torch.Generator().manual_seed(1))
    x = colours[:, :, None, None].expand(n, 3, 18, 22).contiguous()
    rec = Recorder(CopyPolicy(tiny_editor))
    out = EditPipeline(rec)(x, INSTR, num_frames=model_f, num_inference_steps=3, guidance_scale=2.0, progress=False)
    assert rec.encoded == [(1, model_f, 3, 16, 20)]
    assert out.shape == x.shape

    def nearest(a, b):  # floor(a / b + 1/2) with exact fractions
        return int(Fraction(a, b) + Fraction(1, 2))

    for i in range(n):
        j = nearest(i * (model_f - 1), n - 1)
        s = nearest(j * (n - 1), model_f - 1)
        assert torch.allclose(out[i], colours[s][:, None, None].expand(3, 18, 22), atol=1e-4), i


# ------------------------------------------------------------------------------------------- sampling
def test_sampler_equals_independent_euler_cfg_reference(tiny_editor):
    """Pipeline (scheduler.step, ONE batched cond++uncond forward) == editgrpo.sampling's Euler step
    on diffusers' shifted sigmas with separate cond / uncond forwards and v_u + g (v_c - v_u)."""
    from editgrpo.sampling import cfg_velocity, ode_step, sigma_schedule

    editor = copy.copy(tiny_editor)  # shares the modules; only the config differs
    editor.config = dataclasses.replace(tiny_editor.config, shift=3.0)
    clip = _clip(f=3, h=16, w=16, seed=2)
    steps, g, seed = 4, 2.0, 3
    out = EditPipeline(editor).sample(clip, INSTR, num_inference_steps=steps, guidance_scale=g, seed=seed,
                                      progress=False)

    def reference(shift, guidance):
        cond, uncond = editor.encode_condition(clip[None], [INSTR])
        z = torch.randn((1, *editor.latent_shape(cond)), generator=torch.Generator().manual_seed(seed))
        sig = sigma_schedule(steps, shift=shift)
        for i in range(steps):
            s = sig[i:i + 1]
            v = cfg_velocity(editor.velocity(z, s, cond), editor.velocity(z, s, uncond), guidance)
            z = ode_step(v, z, sig[i], sig[i + 1])
        return editor.decode(z)[0]

    ref = reference(3.0, g)
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()
    # the same schedule through the shift argument, on the editor whose own shift is 1
    assert tiny_editor.config.shift == 1.0
    by_arg = EditPipeline(tiny_editor).sample(clip, INSTR, num_inference_steps=steps, guidance_scale=g, seed=seed,
                                              progress=False, shift=3.0)
    assert torch.allclose(by_arg, ref, atol=1e-4), (by_arg - ref).abs().max()
    # the check can fail: the shift and the guidance both change the result
    assert (reference(1.0, g) - out).abs().max() > 1e-3
    assert (reference(3.0, 1.0) - out).abs().max() > 1e-3


def test_sampler_with_a_guidance_interval_guides_only_its_steps(tiny_editor, monkeypatch):
    """guidance_interval=(lo, hi): CFG on the steps with lo < sigma <= hi, the conditional forward alone (one row)
    on the others; equal to a hand-written loop, and a bad interval is a UserError naming it."""
    from editgrpo.sampling import cfg_velocity, ode_step, sigma_schedule

    clip = _clip(f=3, h=16, w=16, seed=2)
    steps, g, seed, interval = 5, 2.0, 3, (0.5, 1.0)
    sig = sigma_schedule(steps, shift=tiny_editor.config.shift)
    guided = [lo < float(s) <= hi for s in sig[:-1] for lo, hi in [interval]]
    assert 0 < sum(guided) < steps
    rows = []
    real = tiny_editor.velocity
    monkeypatch.setattr(tiny_editor, "velocity", lambda z, s, c: rows.append(z.shape[0]) or real(z, s, c))
    out = EditPipeline(tiny_editor).sample(clip, INSTR, num_inference_steps=steps, guidance_scale=g, seed=seed,
                                           progress=False, guidance_interval=interval)
    assert rows == [2 if gd else 1 for gd in guided]
    monkeypatch.setattr(tiny_editor, "velocity", real)
    cond, uncond = tiny_editor.encode_condition(clip[None], [INSTR])
    z = torch.randn((1, *tiny_editor.latent_shape(cond)), generator=torch.Generator().manual_seed(seed))
    for i in range(steps):
        s = sig[i:i + 1]
        v = tiny_editor.velocity(z, s, cond)
        if guided[i]:
            v = cfg_velocity(v, tiny_editor.velocity(z, s, uncond), g)
        z = ode_step(v, z, sig[i], sig[i + 1])
    assert torch.allclose(out, tiny_editor.decode(z)[0], atol=1e-4)
    plain = EditPipeline(tiny_editor).sample(clip, INSTR, num_inference_steps=steps, guidance_scale=g, seed=seed,
                                             progress=False)
    assert (plain - out).abs().max() > 1e-3
    with pytest.raises(UserError, match="guidance_interval"):
        EditPipeline(tiny_editor).sample(clip, INSTR, num_inference_steps=steps, guidance_interval=(0.9, 0.1))


def test_same_seed_same_edit_and_the_editor_method(tiny_editor):
    x = _clip(f=4, h=20, w=18, seed=4)
    kw = dict(num_inference_steps=3, progress=False)
    a = EditPipeline(tiny_editor)(x, INSTR, seed=5, **kw)
    b = tiny_editor.edit(x, INSTR, seed=5, **kw)
    c = tiny_editor.edit(x, INSTR, seed=6, **kw)
    gen = tiny_editor.edit(x, INSTR, generator=torch.Generator().manual_seed(5), **kw)
    assert a.shape == x.shape and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and torch.equal(a, gen)
    assert (a - c).abs().max() > 1e-3


def test_reference_image_enters_the_edit(tiny_editor):
    x = _clip(f=3, h=16, w=16, seed=7)
    ref = torch.rand(3, 40, 30, generator=torch.Generator().manual_seed(8))
    kw = dict(num_inference_steps=2, seed=1, progress=False)
    with_ref = tiny_editor.edit(x, INSTR, ref, **kw)
    assert with_ref.shape == x.shape
    assert (with_ref - tiny_editor.edit(x, INSTR, **kw)).abs().max() > 1e-4


def test_hunyuan_vae_editor_adapts_to_4k_plus_1_and_multiples_of_16():
    from viva_base.tiny import TinySpec, make_tiny_editor

    editor = make_tiny_editor(TinySpec(vae="hunyuan", latent_channels=4))
    assert editor.temporal_ratio == 4 and editor.spatial_ratio == 16
    rec = Recorder(editor)
    x = _clip(f=10, h=24, w=40, seed=9)  # a 10-frame 40x24 clip
    out = EditPipeline(rec)(x, INSTR, num_inference_steps=2, progress=False)
    assert rec.encoded == [(1, 9, 3, 16, 32)] and rec.decoded == [(1, 9, 3, 16, 32)]
    assert editor.valid_num_frames(9) == 9
    assert out.shape == (10, 3, 24, 40) and torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1


# -------------------------------------------------------------------------------------- errors, outputs
@pytest.mark.parametrize("video,instruction,kw,message", [
    (_clip(), "", {}, "instruction is empty"),
    (_clip(), "   ", {}, "instruction is empty"),
    (torch.rand(3, 16, 16), INSTR, {}, "(F, 3, H, W)"),
    (_clip() * 255, INSTR, {}, "[0, 1]"),
    (_clip(), INSTR, {"num_inference_steps": 0}, "at least 1 step"),
    (_clip(), INSTR, {"size": "64"}, "WIDTHxHEIGHT"),
    (_clip(), INSTR, {"num_frames": 0}, "at least 1"),
])
def test_api_rejects_bad_arguments(tiny_editor, video, instruction, kw, message):
    with pytest.raises(UserError) as info:
        EditPipeline(tiny_editor)(video, instruction, progress=False, **kw)
    assert message in str(info.value)


def test_uint8_input_equals_float_input(tiny_editor):
    x8 = (torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 255).round().to(torch.uint8)
    kw = dict(num_inference_steps=2, progress=False)
    assert torch.equal(tiny_editor.edit(x8, INSTR, **kw), tiny_editor.edit(x8.float() / 255, INSTR, **kw))


@pytest.mark.parametrize("ext", VIDEO_OUTPUT_EXTENSIONS)
def test_every_accepted_output_extension_is_writable(tmp_path, ext):
    path = check_output_path(tmp_path / f"o{ext}", 3)
    write_video(path, _clip(f=3, h=16, w=16), fps=10)
    assert probe_video(path)[:3] == (3, 16, 16)


def test_output_path_checks_agree_with_the_writer(tmp_path):
    for name in ("o.avi", "o.txt"):
        with pytest.raises(VideoError, match="unsupported output extension"):
            check_output_path(tmp_path / name)
        with pytest.raises(VideoError, match="unsupported output extension"):
            write_video(tmp_path / name, _clip(f=2, h=16, w=16))
    with pytest.raises(VideoError, match="one frame"):
        check_output_path(tmp_path / "o.png", 5)
    check_output_path(tmp_path / "o.png", 1)
    with pytest.raises(VideoError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "o.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # a folder output replaces the folder: never one holding other files (e.g. --out .)
    (tmp_path / "mine.txt").write_text("keep me")
    for name in (".", ""):
        with pytest.raises(VideoError, match="holds other files"):
            check_output_path(tmp_path / name if name else tmp_path)
    (tmp_path / "noext").write_text("x")
    with pytest.raises(VideoError, match="is a file"):
        check_output_path(tmp_path / "noext")
    seq = write_video(tmp_path / "seq", _clip(f=2, h=16, w=16))
    assert check_output_path(seq) == seq  # a previous PNG-sequence output may be replaced
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_long_large_input_is_read_strided_shrunk_and_mapped_back(tiny_editor, tmp_path, caplog):
    """40 uniform-colour PNG frames of 50x70 with max_frames=9, max_side=32: the file is decoded every
    4th frame (read_stride), edited as 9 frames of 24x32 (warnings say so), and each of the 40 output
    frames (lossless .mkv) has the colour of the source frame the nearest-index chain picks."""
    from PIL import Image

    n, k = 40, 4
    colours = (torch.rand(n, 3, generator=torch.Generator().manual_seed(5)) * 255).round() / 255
    (tmp_path / "seq").mkdir()
    for i in range(n):
        Image.new("RGB", (70, 50), tuple(int(round(float(c) * 255)) for c in colours[i])).save(tmp_path / "seq" / f"{i:03d}.png")
    small = copy.copy(tiny_editor)
    small.config = dataclasses.replace(tiny_editor.config, max_frames=9, max_side=32)
    rec = Recorder(CopyPolicy(small))
    with caplog.at_level("WARNING", logger="viva_base.pipeline"):
        out = EditPipeline(rec).edit_file(tmp_path / "seq", INSTR, tmp_path / "out.mkv", num_inference_steps=2,
                                          progress=False)
    assert rec.encoded == [(1, 9, 3, 24, 32)]
    assert "subsampled uniformly" in caplog.text and "larger than the model's max side" in caplog.text
    assert probe_video(out) == (n, 50, 70, 8.0)
    got = read_video(out).frames

    def nearest(a, b):
        return int(Fraction(a, b) + Fraction(1, 2))

    assert read_stride(n, 9) == k
    for o in range(n):
        j = nearest(o * 8, n - 1)               # output frame -> edited frame
        s = nearest(j * (n - 1), 8)             # edited frame -> wanted source frame
        d = min(nearest(s, k), -(-n // k) - 1)  # wanted source -> nearest decoded (every k-th) frame
        assert torch.allclose(got[o], colours[k * d][:, None, None].expand(3, 50, 70), atol=1.5 / 255), o


def test_a_clip_of_the_training_size_is_edited_at_that_size():
    """The VIVA editor's default `max_side` is the longer side: at 720, a 480 x 848 input (recipes/sft_viva.yaml's
    training size, HunyuanVideo's 480p) was shrunk to 400 x 720, edited, and scaled back up."""
    from viva_base.model import EditorConfig
    from viva_base.recipe import load_recipe
    from viva_base.sft import SFTConfig

    cfg = EditorConfig()
    h, w = load_recipe(SFTConfig, ["recipe=recipes/sft_viva.yaml"]).data.size
    assert plan_clip(33, h, w, temporal_ratio=4, spatial_multiple=16, max_frames=cfg.max_frames,
                     max_side=cfg.max_side) == (33, h, w)
