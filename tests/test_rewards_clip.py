"""CLIP rewards (clip_if, clip_sp, pickscore, hps) on tiny random CLIPs loaded through the real loaders.

Every built-in is checked against an independent computation: the transformers processor + CLIPModel
forward, or open_clip's own PIL transforms + model forward.
"""
from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from rewards import build_reward, frame_indices, parse_frames
from rewards.clip import clip_direction_score, clip_if_score, clip_sp_score, frame_text_similarity, load_clip
from rewards.tiny import make_tiny_hf_clip, make_tiny_open_clip, tiny_open_clip_config

SIZE = 32  # the tiny models' image size


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_hf_clip(tmp_path_factory.mktemp("hf_clip"), image_size=SIZE)


@pytest.fixture(scope="module")
def oc_model(tmp_path_factory):
    name, weights = make_tiny_open_clip(tmp_path_factory.mktemp("oc_clip"), image_size=SIZE)
    return name, weights


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    from transformers import AutoProcessor, CLIPModel

    return CLIPModel.from_pretrained(hf_dir).eval(), AutoProcessor.from_pretrained(hf_dir)


def quantised_video(b, f, h=SIZE, w=SIZE, seed=0):
    """Random frames on the uint8 grid, so PIL round trips are exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, f, 3, h, w), generator=g).float() / 255


CAPTIONS = dict(
    source_captions=["a red cat on a sofa", "a dog on the grass", "a car on the road"],
    target_captions=["a blue cat on a sofa", "a dog in the snow", "a yellow car on the road"],
    instructions=["make the cat blue", "add snow", "make the car yellow"],
)


def call(reward, edited, source, **override):
    b = edited.shape[0]
    kw = {k: v[:b] for k, v in CAPTIONS.items()}
    kw.update(override)
    return reward(edited, source, **kw)


# ------------------------------------------------------------------------------------------------
# frame sampling
# ------------------------------------------------------------------------------------------------
def test_frame_indices():
    assert frame_indices(5, "all") == [0, 1, 2, 3, 4]
    assert frame_indices(7, {"every": 3}) == [0, 3, 6]
    assert frame_indices(9, {"num": 3}) == [0, 4, 8]
    assert frame_indices(10, {"num": 4}) == [0, 3, 6, 9]
    assert frame_indices(3, {"num": 8}) == [0, 1, 2]
    assert frame_indices(6, {"num": 1}) == [0]
    for bad in ("some", {"num": 0}, {"every": 2, "num": 3}, {"step": 2}, {"num": 2.5}):
        with pytest.raises(ValueError, match="frame sampling"):
            parse_frames(bad)


# ------------------------------------------------------------------------------------------------
# the math on known vectors
# ------------------------------------------------------------------------------------------------
def test_score_functions_on_known_vectors():
    e = torch.eye(3)
    img = torch.stack([e[0], e[1]])[None]  # one video, 2 frames: x then y
    t_x, t_y = e[0][None], e[1][None]
    assert frame_text_similarity(img, t_x).item() == 0.5
    assert clip_if_score(img, t_x, t_y).item() == 0.0
    assert clip_if_score(img, t_x, e[2][None]).item() == 0.5
    diag = torch.nn.functional.normalize(torch.tensor([1.0, 1.0, 0.0]), dim=0)
    assert clip_sp_score(img, torch.stack([diag, e[1]])[None]).item() == pytest.approx((2 ** -0.5 + 1) / 2)
    # direction: frame 0 moves x -> diag (d = (-0.29, 0.71, 0)/|.|), frame 1 does not move (scores 0); the captions
    # move x -> y (d = (-1, 1, 0)/sqrt 2): cos = (0.29 + 0.71) / (sqrt 2 |(-0.29, 0.71)|)
    edited = torch.stack([diag, e[1]])[None]
    d = diag - e[0]
    expected = float((d * torch.tensor([-1.0, 1.0, 0.0])).sum() / (d.norm() * 2 ** 0.5)) / 2
    assert clip_direction_score(img, edited, t_x, t_y).item() == pytest.approx(expected, abs=1e-6)
    assert clip_direction_score(img, img, t_x, t_y).item() == 0.0
    assert clip_direction_score(img, torch.stack([e[1], e[1]])[None], t_x, t_y).item() == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------
# loaders
# ------------------------------------------------------------------------------------------------
def test_loaders_cache_once_per_process(hf_dir, oc_model):
    assert load_clip("hf:" + hf_dir) is load_clip("hf:" + hf_dir)
    assert load_clip("open_clip:" + oc_model[0]) is load_clip("open_clip:" + oc_model[0])
    a = build_reward("clip_if", model="hf:" + hf_dir)
    b = build_reward("pickscore", model="hf:" + hf_dir)
    video = torch.rand(1, 1, 3, SIZE, SIZE)
    assert a.scorer(video) is b.scorer(video)


def test_loader_errors(tmp_path):
    with pytest.raises(ValueError, match="needs pretrained"):
        load_clip("open_clip:ViT-B-32")
    with pytest.raises(OSError, match="cannot load the transformers CLIP"):
        load_clip("hf:" + str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        load_clip("open_clip:local-dir:" + str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_clip("open_clip:ViT-B-32", pretrained=str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="open_clip models only"):
        build_reward("clip_if", model="hf:x", pretrained="y")


def test_preprocess_resize_and_crop(hf_dir, oc_model):
    for scorer in (load_clip("hf:" + hf_dir), load_clip("open_clip:" + oc_model[0])):
        # a constant image stays that constant at any size
        colour = torch.tensor([0.2, 0.5, 0.9]).view(3, 1, 1)
        small, large = colour.expand(3, SIZE, SIZE), colour.expand(3, 48, 80)
        emb = scorer.encode_images([small[None], large[None]])
        torch.testing.assert_close(emb[0], emb[1], atol=1e-5, rtol=0)
        # shortest side already at size: only the center crop acts, so the borders do not matter
        center = torch.rand(3, SIZE, SIZE)
        wide = torch.rand(3, SIZE, SIZE + 16)
        wide[:, :, 8 : 8 + SIZE] = center
        emb = scorer.encode_images(torch.stack([center, wide[:, :, 8 : 8 + SIZE]]))
        emb_wide = scorer.encode_images(wide[None])
        torch.testing.assert_close(emb_wide[0], emb[0], atol=1e-6, rtol=0)


def test_hf_preprocess_matches_transformers_processor(hf_dir, hf_model):
    """Resizing non-square frames: our torch preprocessing against the transformers image processor."""
    _, processor = hf_model
    for h, w in ((45, 70), (90, 33)):
        frames = torch.rand(3, 3, h, w)
        ours = load_clip("hf:" + hf_dir).preprocess(frames)
        theirs = processor.image_processor(images=list(frames), do_rescale=False, return_tensors="pt")["pixel_values"]
        assert ours.shape == theirs.shape == (3, 3, SIZE, SIZE)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_open_clip_preprocess_matches_open_clip_transforms(oc_model):
    """Our tensor preprocessing against open_clip's PIL transforms, on smooth (gradient) frames: equal up
    to 8-bit rounding of PIL's output; a crop off by one pixel would differ by about 0.1."""
    _, _, transform = open_clip.create_model_and_transforms(oc_model[0])
    for h, w in ((45, 70), (90, 33)):
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        frame = (torch.stack([yy, xx, yy * xx]) * 255).round() / 255
        pil = Image.fromarray((frame.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        ours = load_clip("open_clip:" + oc_model[0]).preprocess(frame[None])[0]
        torch.testing.assert_close(ours, transform(pil), atol=0.03, rtol=0)


# ------------------------------------------------------------------------------------------------
# exact identities
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["hf", "open_clip"])
def test_clip_if_zero_and_clip_sp_one(backend, hf_dir, oc_model):
    model = "hf:" + hf_dir if backend == "hf" else "open_clip:" + oc_model[0]
    video = torch.rand(3, 4, 3, 40, 56)
    same = list(CAPTIONS["source_captions"])
    out = build_reward("clip_if", model=model)(video, video, source_captions=same, target_captions=same,
                                               instructions=CAPTIONS["instructions"])
    assert out.scores.dtype == torch.float32 and out.scores.device.type == "cpu"
    assert torch.equal(out.scores, torch.zeros(3))
    sp = call(build_reward("clip_sp", model=model), video, video).scores
    torch.testing.assert_close(sp, torch.ones(3), atol=1e-6, rtol=0)
    other = call(build_reward("clip_sp", model=model), video, torch.rand(3, 4, 3, 40, 56)).scores
    assert (other < 1 - 1e-4).all()


# ------------------------------------------------------------------------------------------------
# against independent computations
# ------------------------------------------------------------------------------------------------
def hf_reference_cos(hf_model, frames, texts):
    """cos(frame_i, text_j) via transformers' processor + CLIPModel forward (logits / logit_scale)."""
    model, processor = hf_model
    inputs = processor(text=texts, images=list(frames), do_rescale=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    return out.logits_per_image / model.logit_scale.exp(), model.logit_scale.exp().item(), out


def test_hf_rewards_match_transformers_forward(hf_dir, hf_model):
    b, f = 2, 3
    edited, source = quantised_video(b, f, seed=1), quantised_video(b, f, seed=2)
    kw = {k: v[:b] for k, v in CAPTIONS.items()}
    clip_if = build_reward("clip_if", model="hf:" + hf_dir)(edited, source, **kw).scores
    pick = build_reward("pickscore", model="hf:" + hf_dir, processor=hf_dir)(edited, source, **kw).scores
    sp = build_reward("clip_sp", model="hf:" + hf_dir)(edited, source, **kw).scores
    for i in range(b):
        cos, scale, _ = hf_reference_cos(hf_model, edited[i], [kw["target_captions"][i], kw["source_captions"][i]])
        expected_if = cos[:, 0].mean() - cos[:, 1].mean()
        assert clip_if[i].item() == pytest.approx(expected_if.item(), abs=1e-5)
        assert pick[i].item() == pytest.approx(scale * cos[:, 0].mean().item(), abs=1e-4)
        model, processor = hf_model
        with torch.no_grad():
            pix = processor.image_processor(images=list(edited[i]) + list(source[i]), do_rescale=False,
                                            return_tensors="pt")["pixel_values"]
            feats = model.get_image_features(pixel_values=pix)
            feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
        feats = torch.nn.functional.normalize(feats, dim=-1)
        expected_sp = (feats[:f] * feats[f:]).sum(-1).mean()
        assert sp[i].item() == pytest.approx(expected_sp.item(), abs=1e-5)


def open_clip_reference_cos(model_name, frames, texts):
    """cos(frame_i, text_j) via open_clip's own PIL transforms and model forward."""
    model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    images = torch.stack([
        preprocess(Image.fromarray((fr.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))) for fr in frames
    ])
    with torch.no_grad():
        out = model(images, tokenizer(texts))
    img, txt = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
    return img @ txt.T, img


def test_open_clip_rewards_match_open_clip_forward(oc_model):
    b, f = 2, 3
    name = oc_model[0]
    edited, source = quantised_video(b, f, seed=3), quantised_video(b, f, seed=4)
    kw = {k: v[:b] for k, v in CAPTIONS.items()}
    clip_if = build_reward("clip_if", model="open_clip:" + name)(edited, source, **kw).scores
    sp = build_reward("clip_sp", model="open_clip:" + name)(edited, source, **kw).scores
    for i in range(b):
        cos, img = open_clip_reference_cos(name, edited[i], [kw["target_captions"][i], kw["source_captions"][i]])
        assert clip_if[i].item() == pytest.approx((cos[:, 0].mean() - cos[:, 1].mean()).item(), abs=1e-5)
        _, img_src = open_clip_reference_cos(name, source[i], ["x"])
        assert sp[i].item() == pytest.approx((img * img_src).sum(-1).mean().item(), abs=1e-5)


def test_clip_dir_matches_open_clip_forward(oc_model):
    """clip_dir against open_clip's own transforms and features: cos(E(edit) - E(src), E(t_edit) - E(t_src))."""
    b, f = 2, 3
    name = oc_model[0]
    edited, source = quantised_video(b, f, seed=5), quantised_video(b, f, seed=6)
    kw = {k: v[:b] for k, v in CAPTIONS.items()}
    got = build_reward("clip_dir", model="open_clip:" + name)(edited, source, **kw).scores
    model = open_clip.create_model_and_transforms(name)[0].eval()
    tokenizer = open_clip.get_tokenizer(name)
    for i in range(b):
        _, img = open_clip_reference_cos(name, edited[i], ["x"])
        _, img_src = open_clip_reference_cos(name, source[i], ["x"])
        with torch.no_grad():
            txt = torch.nn.functional.normalize(model.encode_text(tokenizer(
                [kw["target_captions"][i], kw["source_captions"][i]])), dim=-1)
        d_img = torch.nn.functional.normalize(img - img_src, dim=-1)
        d_txt = torch.nn.functional.normalize(txt[0] - txt[1], dim=0)
        assert got[i].item() == pytest.approx((d_img @ d_txt).mean().item(), abs=1e-5)


def test_hps_loads_an_hps_style_checkpoint(tmp_path, oc_model):
    """HPS: an open_clip architecture + a `{"state_dict": {"module.*": ...}}` .pt file, as HPS ships."""
    cfg = tiny_open_clip_config(image_size=SIZE)
    (tmp_path / "tiny-hps-arch.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "tiny-hps-arch.json")
    tuned_name, _ = make_tiny_open_clip(tmp_path / "tuned", image_size=SIZE, seed=7)  # the "HPS" weights
    tuned = open_clip.create_model(tuned_name)
    ckpt = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in tuned.state_dict().items()}}, ckpt)

    b, f = 2, 2
    edited = quantised_video(b, f, seed=5)
    kw = {k: v[:b] for k, v in CAPTIONS.items()}
    hps = build_reward("hps", model="open_clip:tiny-hps-arch", checkpoint=str(ckpt))(edited, edited, **kw).scores
    base = build_reward("hps", model="open_clip:" + oc_model[0])(edited, edited, **kw).scores
    for i in range(b):
        cos, _ = open_clip_reference_cos(tuned_name, edited[i], [kw["target_captions"][i]])
        assert hps[i].item() == pytest.approx(cos[:, 0].mean().item(), abs=1e-5)
    assert not torch.allclose(hps, base, atol=1e-3)  # the checkpoint's weights were used
    with pytest.raises(ValueError, match="checkpoint"):
        build_reward("hps")
    with pytest.raises(FileNotFoundError, match="HPS checkpoint"):
        build_reward("hps", checkpoint=str(tmp_path / "nope.pt"))


def test_frame_sampling_option(hf_dir):
    video = torch.rand(2, 9, 3, SIZE, SIZE)
    kw = {k: v[:2] for k, v in CAPTIONS.items()}
    for frames in ({"num": 3}, {"every": 4}):
        idx = frame_indices(9, frames)
        sampled = build_reward("pickscore", model="hf:" + hf_dir, frames=frames)(video, video, **kw).scores
        explicit = build_reward("pickscore", model="hf:" + hf_dir)(video[:, idx], video[:, idx], **kw).scores
        torch.testing.assert_close(sampled, explicit, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# batch composition and batched forwards
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["clip_if", "clip_sp", "pickscore", "hps"])
def test_scores_do_not_depend_on_batch_composition(name, hf_dir, oc_model):
    model = "open_clip:" + oc_model[0] if name == "hps" else "hf:" + hf_dir
    reward = build_reward(name, model=model)
    edited, source = torch.rand(3, 2, 3, 40, 40), torch.rand(3, 2, 3, 40, 40)
    batch = call(reward, edited, source).scores
    alone = torch.cat([
        reward(edited[i : i + 1], source[i : i + 1], **{k: [v[i]] for k, v in CAPTIONS.items()}).scores
        for i in range(3)
    ])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    # the same item next to different neighbours
    swapped = call(reward, torch.cat([edited[:1], edited[2:], edited[1:2]]),
                   torch.cat([source[:1], source[2:], source[1:2]]),
                   **{k: [v[0], v[2], v[1]] for k, v in CAPTIONS.items()}).scores
    torch.testing.assert_close(swapped, batch[[0, 2, 1]], atol=1e-5, rtol=1e-5)


def count_forwards(module, calls):
    return module.register_forward_hook(lambda mod, args, kwargs, out: calls.append(
        (args[0] if args else next(iter(kwargs.values()))).shape[0]), with_kwargs=True)


@pytest.mark.parametrize("backend", ["hf", "open_clip"])
def test_64_frames_one_batched_forward(backend, hf_dir, oc_model):
    model = "hf:" + hf_dir if backend == "hf" else "open_clip:" + oc_model[0]
    scorer = load_clip(model)
    vision = scorer.model.vision_model if backend == "hf" else scorer.model.visual
    text = scorer.model.text_model if backend == "hf" else scorer.model.transformer
    vision_calls, text_calls = [], []
    hooks = [count_forwards(vision, vision_calls), count_forwards(text, text_calls)]
    try:
        edited, source = torch.rand(2, 32, 3, 36, 36), torch.rand(2, 32, 3, 36, 36)  # 64 frames each
        call(build_reward("clip_if", model=model), edited, source)
        assert vision_calls == [64] and len(text_calls) == 1
        vision_calls.clear()
        call(build_reward("clip_sp", model=model), edited, source)
        assert vision_calls == [128]  # source and edited frames together
        vision_calls.clear()
        call(build_reward("clip_sp", model=model, max_batch=50), edited, source)
        assert vision_calls == [50, 50, 28]
    finally:
        for h in hooks:
            h.remove()


def test_input_validation(hf_dir):
    reward = build_reward("clip_if", model="hf:" + hf_dir)
    video = torch.rand(1, 2, 3, SIZE, SIZE)
    kw = {k: v[:1] for k, v in CAPTIONS.items()}
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reward(video * 255, video, **kw)
    with pytest.raises(ValueError, match=r"\(B, F, 3, H, W\)"):
        reward(video[0], video, **kw)
    with pytest.raises(ValueError, match="list of 1 strings"):
        reward(video, video, **{**kw, "target_captions": ["a", "b"]})
    with pytest.raises(ValueError, match="frame counts differ"):
        build_reward("clip_sp", model="hf:" + hf_dir)(video, video[:, :1], **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_models_follow_the_input_device(hf_dir, oc_model):
    edited, source = torch.rand(2, 3, 3, 40, 40), torch.rand(2, 3, 3, 40, 40)
    for name, model in (("clip_if", "hf:" + hf_dir), ("clip_sp", "open_clip:" + oc_model[0])):
        reward = build_reward(name, model=model)
        on_cpu = call(reward, edited, source).scores
        on_gpu = call(reward, edited.cuda(), source.cuda()).scores
        assert on_gpu.device.type == "cpu" and on_gpu.dtype == torch.float32
        assert reward.scorer(edited.cuda()).device.type == "cuda"
        torch.testing.assert_close(on_gpu, on_cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["hf", "open_clip"])
def test_aspect_pad_scores_the_whole_of_a_wide_frame(backend, hf_dir, oc_model):
    """CLIP's own preprocessing keeps the middle square of a frame: on a wide clip an edit near the left edge moved no
    CLIP reward. `aspect=pad` scores the whole frame (scaled to fit, padded with the mean colour: independent
    reference below); on square frames both are the same."""
    import dataclasses

    import torch.nn.functional as F

    model = "hf:" + hf_dir if backend == "hf" else "open_clip:" + oc_model[0]
    g = torch.Generator().manual_seed(0)
    source = torch.rand(1, 2, 3, 32, 64, generator=g)
    edited = source.clone()
    edited[..., :8] = 1 - edited[..., :8]  # an edit of the left eighth only
    crop, pad = (build_reward("clip_sp", model=model, aspect=a) for a in ("crop", "pad"))
    assert call(crop, edited, source).scores.item() == pytest.approx(1.0, abs=1e-6)  # unseen
    assert call(pad, edited, source).scores.item() < 1 - 1e-4
    square = source[..., :32]
    assert torch.equal(call(crop, square, square.flip(-1)).scores, call(pad, square, square.flip(-1)).scores)
    # pad = the frame resized to 16 x 32 inside the 32 x 32 input, the 8-row bands above and below the mean colour
    scorer = load_clip(pad.spec, device="cpu", dtype=torch.float32)
    pre = scorer.preprocess
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    assert pre.interpolation == "bicubic"
    small = F.interpolate(edited[0], size=(16, 32), mode="bicubic", antialias=True, align_corners=False)
    canvas = mean.expand(2, 3, 32, 32).clone()
    canvas[:, :, 8:24] = small.clamp(0, 1) if pre.clamp else small
    want = scorer.encode_images(canvas, preprocess=dataclasses.replace(pre, resize_mode="squash", resize_to=None))
    got = scorer.encode_images(edited[0], preprocess=pre.whole_frame())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="aspect must be one of crop, pad"):
        build_reward("clip_sp", model=model, aspect="stretch")

